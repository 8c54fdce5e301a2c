//! `PostgresStore` and `SqlxStore` on PostgreSQL as operations teams run it, each test on a
//! throwaway PostgreSQL server of its own (initdb and pg_ctl in a temporary directory, on a free
//! port of 127.0.0.1) and through a real axum server: least-privilege roles and prepared
//! schemas, `serializable` as the database's default isolation, a database turned read-only and
//! back, one table named two ways, search paths that differ between servers, role timeouts,
//! restarts, terminated and exhausted connections, `Claim` handlers whose transactions fail,
//! the database's own error messages, raw bytes and the database's clock.
//!
//! The servers are started from `PG_BIN` (the directory of `initdb`, `pg_ctl` and `postgres`),
//! run as `PG_USER` when the tests run as root: `scripts/test-services` exports both. Each test
//! is skipped when `PG_BIN` is not set. Two servers run at once at most, whatever the test
//! threads; the whole file takes about a minute.
#![cfg(all(feature = "postgres", feature = "sqlx"))]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use support::{Reply, Runs, Served, serve, server_url};
use tower_idempotency::{Claim, ClaimError, IdempotencyLayer, PostgresStore, SqlxStore};

// --- A PostgreSQL server of the test's own -----------------------------------------------------

/// A PostgreSQL server of the test's own, stopped and deleted when dropped.
struct Pg {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    /// The user the server runs as, when the tests run as root (PostgreSQL refuses root).
    user: Option<String>,
    port: u16,
    /// One of the [`SERVERS`] at once, released once the server is stopped.
    _turn: tokio::sync::SemaphorePermit<'static>,
}

/// How many tests run a server at once, whatever the test threads: the tests measure times
/// (a `503` within the store timeout, a run within its lease), which a machine loaded with
/// servers and their traffic would stretch.
static SERVERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Pg {
    /// A new server from `PG_BIN`, `conf` appended to its postgresql.conf, started, with a
    /// database `app`; `None`, after printing that `test` is skipped, without `PG_BIN`.
    async fn start(test: &str, conf: &str) -> Option<Pg> {
        let bin = PathBuf::from(server_url("PG_BIN", test)?);
        let turn = SERVERS.acquire().await.unwrap();
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let user = root.then(|| std::env::var("PG_USER").unwrap_or_else(|_| "postgres".into()));
        let dir = std::env::temp_dir().join(format!(
            "postgres-ops-{}",
            tower_idempotency::LockToken::random()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(user) = &user {
            let chown = Command::new("chown").arg(user).arg(&dir).status().unwrap();
            assert!(chown.success(), "chown {user} {}", dir.display());
        }
        let data = dir.join("data");
        let mut pg = Pg {
            dir,
            data,
            bin,
            user,
            port: free_port(),
            _turn: turn,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let mut c = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            c,
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\nfull_page_writes = off\n{conf}",
            pg.port,
            pg.dir.display()
        )
        .unwrap();
        // A port taken between `free_port` and the start: another one.
        for _ in 0..3 {
            if pg.ctl(&["-w", "-t", "60", "start"]) {
                pg.exec("postgres", "CREATE DATABASE app").await;
                return Some(pg);
            }
            pg.port = free_port();
            writeln!(c, "port = {}", pg.port).unwrap();
        }
        panic!(
            "pg_ctl start: {:?}",
            std::fs::read_to_string(pg.dir.join("log"))
        );
    }

    /// The PostgreSQL program `name`, run as the server's user.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn ctl(&self, args: &[&str]) -> bool {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    }

    fn ctl_start(&self) {
        assert!(self.ctl(&["-w", "-t", "60", "start"]), "pg_ctl start");
    }

    fn stop(&self, mode: &str) {
        assert!(self.ctl(&["-w", "-m", mode, "stop"]), "pg_ctl stop");
    }

    /// The server log's ERROR lines, without duplicates.
    fn errors(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let mut seen = Vec::new();
        for line in log
            .lines()
            .filter(|l| l.contains("ERROR:") || l.contains("FATAL:"))
        {
            let text = line
                .split_once("ERROR:")
                .or(line.split_once("FATAL:"))
                .unwrap()
                .1
                .trim()
                .to_owned();
            if !seen.contains(&text) {
                seen.push(text);
            }
        }
        seen
    }

    fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    async fn client(&self, user: &str, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(user, db), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    async fn exec(&self, db: &str, sql: &str) {
        self.client("postgres", db)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client("postgres", "app")
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self.ctl(&["-w", "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- Apps ------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Postgres,
    Sqlx,
}

const KINDS: [Kind; 2] = [Kind::Postgres, Kind::Sqlx];

/// A store of `kind` on `url`, migrated when `migrate`.
#[derive(Clone)]
enum Store {
    Pg(PostgresStore),
    Sqlx(SqlxStore),
}

impl Store {
    async fn open(kind: Kind, url: &str) -> Store {
        match kind {
            Kind::Postgres => Store::Pg(PostgresStore::connect(url).await.unwrap()),
            Kind::Sqlx => Store::Sqlx(SqlxStore::new(sqlx::PgPool::connect(url).await.unwrap())),
        }
    }

    async fn migrate(&self) -> Result<(), tower_idempotency::StoreError> {
        match self {
            Store::Pg(s) => s.migrate().await,
            Store::Sqlx(s) => s.migrate().await,
        }
    }

    fn layer_app(&self, router: Router, f: impl Fn(LayerCfg) -> LayerCfg) -> Router {
        macro_rules! lay {
            ($s:expr) => {{
                let cfg = f(LayerCfg::default());
                let mut layer = IdempotencyLayer::new($s.clone())
                    .require_key(true)
                    .lease(cfg.lease)
                    .ttl(cfg.ttl)
                    .store_timeout(cfg.store_timeout);
                if let Some(max) = cfg.max_response {
                    layer = layer.max_response_bytes(max).max_body_bytes(max);
                }
                router.layer(layer)
            }};
        }
        match self {
            Store::Pg(s) => lay!(s),
            Store::Sqlx(s) => lay!(s),
        }
    }
}

#[derive(Clone, Copy)]
struct LayerCfg {
    lease: Duration,
    ttl: Duration,
    store_timeout: Duration,
    max_response: Option<usize>,
}

impl Default for LayerCfg {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(600),
            store_timeout: Duration::from_secs(2),
            max_response: None,
        }
    }
}

/// A plain handler: counts its runs, sleeps `delay` ms, answers 201 "ran N".
#[derive(Clone, Default)]
struct Plain {
    runs: Runs,
    delay: Arc<AtomicU64>,
}

fn plain_router(p: &Plain) -> Router {
    let p = p.clone();
    Router::new().route(
        "/pay",
        post(move |body: axum::body::Bytes| {
            let p = p.clone();
            async move {
                let n = p.runs.bump();
                let ms = p.delay.load(Ordering::SeqCst);
                if ms > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                (StatusCode::CREATED, format!("ran {n} {}", body.len()))
            }
        }),
    )
}

fn req(key: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post("/pay")
        .header("authorization", "Bearer tenant-a")
        .header("idempotency-key", key)
        .body(body.into())
        .unwrap()
}

async fn plain_app(
    kind: Kind,
    url: &str,
    f: impl Fn(LayerCfg) -> LayerCfg,
) -> (Store, Plain, Served) {
    let store = Store::open(kind, url).await;
    store.migrate().await.unwrap();
    let p = Plain::default();
    let app = store.layer_app(plain_router(&p), f);
    (store, p, serve(app).await)
}

fn problem(reply: &Reply) -> (StatusCode, String) {
    (reply.status, reply.code())
}

// --- Migrations, isolation, read-only -----------------------------------------------------------

/// A least-privilege runtime role (no CREATE on the schema, PostgreSQL 15's default on
/// `public`) on a table its DBA prepared: `migrate()`, safe on every start, finds the table and
/// its index and creates nothing, and the store works for that role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_succeeds_for_a_role_without_create_on_a_prepared_schema() {
    let Some(pg) = Pg::start(
        "migrate_succeeds_for_a_role_without_create_on_a_prepared_schema",
        "",
    )
    .await
    else {
        return;
    };
    // The DBA migrates as the owner, then grants DML only.
    Store::open(Kind::Postgres, &pg.url("postgres", "app"))
        .await
        .migrate()
        .await
        .unwrap();
    pg.exec(
        "app",
        "CREATE ROLE app_rt LOGIN;
         GRANT CONNECT ON DATABASE app TO app_rt;
         GRANT USAGE ON SCHEMA public TO app_rt;
         GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_records TO app_rt;",
    )
    .await;
    let mut failures = Vec::new();
    for kind in KINDS {
        let store = Store::open(kind, &pg.url("app_rt", "app")).await;
        if let Err(err) = store.migrate().await {
            failures.push(format!("{kind:?}: {err}"));
        }
        // The store itself works for that role.
        let p = Plain::default();
        let served = serve(store.layer_app(plain_router(&p), |c| c)).await;
        let r = served.send(req(&format!("priv-{kind:?}"), "x")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// `default_transaction_isolation = 'serializable'` on the database: PostgreSQL fails some of
/// the store's concurrent statements with serialization failures, which the store runs again.
/// A burst of duplicates of one new key is one run and `409`s, and distinct new keys at once
/// all run: no `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_serializable_isolation_duplicates_get_409_and_new_keys_run() {
    let Some(pg) = Pg::start(
        "under_serializable_isolation_duplicates_get_409_and_new_keys_run",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "postgres",
        "ALTER DATABASE app SET default_transaction_isolation = 'serializable'",
    )
    .await;
    let mut report = Vec::new();
    for kind in KINDS {
        // A store timeout that a loaded machine cannot reach: a `503` here is the store's own.
        let (_store, p, served) = plain_app(kind, &pg.url("postgres", "app"), |c| LayerCfg {
            store_timeout: Duration::from_secs(20),
            ..c
        })
        .await;
        p.delay.store(500, Ordering::SeqCst);
        let served = Arc::new(served);
        let mut unavailable = 0;
        for round in 0..5 {
            let key = format!("ser-{kind:?}-{round}");
            let tasks: Vec<_> = (0..24)
                .map(|_| {
                    let served = served.clone();
                    let key = key.clone();
                    tokio::spawn(async move { served.send(req(&key, "same")).await })
                })
                .collect();
            for t in tasks {
                let r = t.await.unwrap();
                match r.status {
                    StatusCode::CREATED | StatusCode::CONFLICT => {}
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(problem(&r).1, "idempotency_store_unavailable");
                        unavailable += 1;
                    }
                    other => panic!("{kind:?}: unexpected {other}: {r:?}"),
                }
            }
        }
        assert_eq!(p.runs.get(), 5, "{kind:?}: one run per key");
        // Distinct new keys at once: btree predicate locks are per page, so even these
        // conflict under SSI.
        p.delay.store(0, Ordering::SeqCst);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let served = served.clone();
                tokio::spawn(async move {
                    served
                        .send(req(&format!("distinct-{kind:?}-{i}"), "d"))
                        .await
                })
            })
            .collect();
        let mut distinct = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            if r.status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(problem(&r).1, "idempotency_store_unavailable");
                unavailable += 1;
            }
            distinct.push(r.status);
        }
        eprintln!(
            "{kind:?}: 64 distinct new keys at once: {:?}",
            count_statuses(&distinct)
        );
        report.push((kind, unavailable));
    }
    assert!(
        report.iter().all(|(_, n)| *n == 0),
        "503s among duplicates: {report:?}; server errors: {:?}",
        pg.errors()
    );
}

/// A read-only database (a hot standby, `default_transaction_read_only`): a clear 503, the
/// handler not run; and once the database is writable again, the store works again at once:
/// the connections opened while it was read-only were closed, not kept in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_answers_503_then_recovers_once_writable() {
    let Some(pg) = Pg::start(
        "a_read_only_database_answers_503_then_recovers_once_writable",
        "",
    )
    .await
    else {
        return;
    };
    let mut stuck = Vec::new();
    for kind in KINDS {
        let (store, p, served) = plain_app(kind, &pg.url("postgres", "app"), |c| c).await;
        let done = served.send(req(&format!("ro-done-{kind:?}"), "a")).await;
        assert_eq!(done.status, StatusCode::CREATED);
        pg.exec(
            "postgres",
            "ALTER DATABASE app SET default_transaction_read_only = on",
        )
        .await;
        // Connections opened from now on are read-only: a pool under load opens some.
        p.delay.store(300, Ordering::SeqCst);
        let served = Arc::new(served);
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let served = served.clone();
                tokio::spawn(
                    async move { served.send(req(&format!("ro-{kind:?}-{i}"), "b")).await },
                )
            })
            .collect();
        let mut ro = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            // A connection opened before the change is still writable: 201 there.
            if r.status != StatusCode::CREATED {
                assert_eq!(
                    problem(&r),
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idempotency_store_unavailable".into()
                    )
                );
            }
            ro.push(r.status);
        }
        eprintln!("{kind:?} read-only: {:?}", count_statuses(&ro));
        p.delay.store(0, Ordering::SeqCst);
        let new = served.send(req(&format!("ro-new-{kind:?}"), "b")).await;
        // Whatever the connection, a new key on a read-only connection is a clean 503.
        if new.status != StatusCode::CREATED {
            assert_eq!(
                problem(&new),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "idempotency_store_unavailable".into()
                )
            );
        }
        let replay = served.send(req(&format!("ro-done-{kind:?}"), "a")).await;
        assert!(
            replay.status == StatusCode::CREATED
                || replay.status == StatusCode::SERVICE_UNAVAILABLE,
            "{replay:?}"
        );
        let runs_ro = p.runs.get();
        // Writable again (the standby promoted, the setting reverted).
        pg.exec(
            "postgres",
            "ALTER DATABASE app RESET default_transaction_read_only",
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut failed = 0;
        for i in 0..20 {
            let r = served
                .send(req(&format!("ro-after-{kind:?}-{i}"), "c"))
                .await;
            if r.status != StatusCode::CREATED {
                assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
                failed += 1;
            }
        }
        assert!(p.runs.get() >= runs_ro);
        if failed > 0 {
            stuck.push(format!(
                "{kind:?}: {failed}/20 new keys got 503 3 s after the database became writable"
            ));
        }
        drop(store);
    }
    assert!(
        stuck.is_empty(),
        "{stuck:?}; server errors: {:?}",
        pg.errors()
    );
}

/// Two stores naming one table two ways (`idempotency_records` and
/// `public.idempotency_records`) migrating at once on an empty database: one advisory lock
/// serializes every migration, so neither fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_spelled_two_ways_migrates_from_both_at_once() {
    let Some(pg) = Pg::start("one_table_spelled_two_ways_migrates_from_both_at_once", "").await
    else {
        return;
    };
    let url = pg.url("postgres", "app");
    let a = PostgresStore::connect(&url).await.unwrap();
    let b_pool = sqlx::PgPool::connect(&url).await.unwrap();
    let b = SqlxStore::builder(b_pool)
        .table("public.idempotency_records")
        .build()
        .unwrap();
    let mut errors = Vec::new();
    for _ in 0..30 {
        pg.exec("app", "DROP TABLE IF EXISTS idempotency_records")
            .await;
        let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
        for r in [ra, rb] {
            if let Err(e) = r {
                errors.push(format!(
                    "{e} / {:?}",
                    std::error::Error::source(&e).map(|s| s.to_string())
                ));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} failures: {:?}; server errors: {:?}",
        errors.len(),
        errors.first(),
        pg.errors()
    );
}

/// Many instances of both stores, same spelling, migrating at once on an empty database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_of_both_stores_migrate_at_once() {
    let Some(pg) = Pg::start("many_instances_of_both_stores_migrate_at_once", "").await else {
        return;
    };
    let url = pg.url("postgres", "app");
    for round in 0..5 {
        pg.exec("app", "DROP TABLE IF EXISTS idempotency_records")
            .await;
        let mut tasks = Vec::new();
        for i in 0..6 {
            let url = url.clone();
            let kind = KINDS[i % 2];
            tasks.push(tokio::spawn(async move {
                Store::open(kind, &url).await.migrate().await
            }));
        }
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        }
    }
}

/// PostgreSQL restarted (fast, then immediate) while a handler runs and while other traffic
/// goes on: no panic, no second run, errors are 503 problem+json, and the running handler's
/// response is replayed once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_traffic_answers_503_and_the_running_handler_is_replayed() {
    let Some(pg) = Pg::start(
        "a_restart_mid_traffic_answers_503_and_the_running_handler_is_replayed",
        "",
    )
    .await
    else {
        return;
    };
    for kind in KINDS {
        for mode in ["fast", "immediate"] {
            let (_store, p, served) = plain_app(kind, &pg.url("postgres", "app"), |c| c).await;
            let served = Arc::new(served);
            p.delay.store(2500, Ordering::SeqCst);
            let key = format!("restart-{kind:?}-{mode}");
            let first = {
                let served = served.clone();
                let key = key.clone();
                tokio::spawn(async move { served.send(req(&key, "r")).await })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Background traffic on other keys (a handler of no delay), through the restart.
            let bg =
                Arc::new(serve(_store.layer_app(plain_router(&Plain::default()), |c| c)).await);
            let stop = Arc::new(AtomicBool::new(false));
            let traffic = {
                let served = bg.clone();
                let stop = stop.clone();
                let mode = mode.to_owned();
                tokio::spawn(async move {
                    let mut i = 0;
                    let mut statuses = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let t0 = std::time::Instant::now();
                        let r = served
                            .send(req(&format!("bg-{kind:?}-{mode}-{i}"), "b"))
                            .await;
                        assert!(
                            t0.elapsed() < Duration::from_millis(2500),
                            "{:?}",
                            t0.elapsed()
                        );
                        if r.status == StatusCode::SERVICE_UNAVAILABLE {
                            assert_eq!(r.code(), "idempotency_store_unavailable");
                        } else {
                            assert!(
                                r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
                                "{r:?}"
                            );
                        }
                        statuses.push(r.status);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    statuses
                })
            };
            pg.stop(mode);
            tokio::time::sleep(Duration::from_millis(300)).await;
            pg.ctl_start();
            let first = first.await.unwrap();
            assert_eq!(
                first.status,
                StatusCode::CREATED,
                "{kind:?} {mode}: {first:?}"
            );
            stop.store(true, Ordering::SeqCst);
            let statuses = traffic.await.unwrap();
            let runs_after_first = p.runs.get();
            // The retry: 409 while the completion is retried in the background, then the replay.
            let mut replayed = None;
            for _ in 0..200 {
                let r = served.send(req(&key, "r")).await;
                match r.status {
                    StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => {
                        r.code();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        replayed = Some(r);
                        break;
                    }
                }
            }
            let replayed = replayed.unwrap_or_else(|| panic!("{kind:?} {mode}: no replay in 20 s"));
            replayed.assert_replay_of(&first);
            assert_eq!(
                p.runs.get(),
                runs_after_first,
                "{kind:?} {mode}: no second run"
            );
            eprintln!(
                "{kind:?} {mode}: background statuses {:?}",
                count_statuses(&statuses)
            );
        }
    }
}

fn count_statuses(statuses: &[StatusCode]) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in statuses {
        *m.entry(s.as_u16()).or_insert(0) += 1;
    }
    m
}

/// The pool's connections killed with `pg_terminate_backend`, between requests and while a
/// handler runs: the next request is served (the pool replaces what broke), the running
/// handler's response is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pool_connections_are_replaced() {
    let Some(pg) = Pg::start("terminated_pool_connections_are_replaced", "").await else {
        return;
    };
    let admin = pg.client("postgres", "postgres").await;
    let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = 'app' AND pid <> pg_backend_pid()";
    for kind in KINDS {
        let (_store, p, served) = plain_app(kind, &pg.url("postgres", "app"), |c| c).await;
        for i in 0..5 {
            let r = served.send(req(&format!("warm-{kind:?}-{i}"), "w")).await;
            assert_eq!(r.status, StatusCode::CREATED);
        }
        let killed: i64 = admin.query_one(kill, &[]).await.unwrap().get(0);
        assert!(killed > 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = served.send(req(&format!("after-kill-{kind:?}"), "w")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{kind:?}: {r:?}");
        // Killed while the handler runs: its completion goes through a new connection.
        p.delay.store(800, Ordering::SeqCst);
        let key = format!("kill-during-{kind:?}");
        let served = Arc::new(served);
        let first = {
            let served = served.clone();
            let key = key.clone();
            tokio::spawn(async move { served.send(req(&key, "k")).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _: i64 = admin.query_one(kill, &[]).await.unwrap().get(0);
        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        let runs = p.runs.get();
        let mut ok = false;
        for _ in 0..100 {
            let r = served.send(req(&key, "k")).await;
            if r.replayed() {
                r.assert_replay_of(&first);
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "{kind:?}: replay after the kill");
        assert_eq!(p.runs.get(), runs);
    }
}

/// `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout` set on the
/// role, a handler slower than all of them and than the lease: one run, then the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_timeouts_shorter_than_a_slow_handler_still_run_it_once() {
    let Some(pg) = Pg::start(
        "role_timeouts_shorter_than_a_slow_handler_still_run_it_once",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "postgres",
        "CREATE ROLE ops LOGIN SUPERUSER;
         ALTER ROLE ops SET statement_timeout = '150ms';
         ALTER ROLE ops SET lock_timeout = '50ms';
         ALTER ROLE ops SET idle_in_transaction_session_timeout = '200ms';",
    )
    .await;
    for kind in KINDS {
        let (_store, p, served) = plain_app(kind, &pg.url("ops", "app"), |c| LayerCfg {
            lease: Duration::from_millis(600),
            ..c
        })
        .await;
        p.delay.store(1500, Ordering::SeqCst);
        let served = Arc::new(served);
        let key = format!("slow-{kind:?}");
        let first = {
            let served = served.clone();
            let key = key.clone();
            tokio::spawn(async move { served.send(req(&key, "s")).await })
        };
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let dup = served.send(req(&key, "s")).await;
            dup.assert_in_progress();
        }
        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        let replay = served.send(req(&key, "s")).await;
        replay.assert_replay_of(&first);
        assert_eq!(p.runs.get(), 1, "{kind:?}");
    }
}

// --- Claim ------------------------------------------------------------------------------------

/// The ledger the Claim handlers write: a deferred unique constraint, so that a handler asked
/// to fail makes its COMMIT fail (not a statement).
const LEDGER: &str = "CREATE TABLE ledger (
        key text NOT NULL,
        CONSTRAINT ledger_key UNIQUE (key) DEFERRABLE INITIALLY DEFERRED
    );
    CREATE TABLE control (fail_commit boolean NOT NULL, hold_ms int NOT NULL);
    INSERT INTO control VALUES (false, 0);";

#[derive(Clone)]
struct ClaimApp {
    runs: Runs,
    sqlx: Option<sqlx::PgPool>,
    pg: Option<deadpool_postgres::Pool>,
}

/// The handler: BEGIN; insert into the ledger (twice when `control.fail_commit`: the COMMIT
/// fails on the deferred constraint); respond_in; sleep `control.hold_ms`; COMMIT.
async fn claim_handler(
    State(app): State<ClaimApp>,
    claim: Claim,
    headers: axum::http::HeaderMap,
) -> Result<Response, ClaimError> {
    app.runs.bump();
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    if let Some(pool) = &app.sqlx {
        let mut tx = pool.begin().await.map_err(ClaimError::database)?;
        let (fail, hold): (bool, i32) = sqlx::query_as("SELECT fail_commit, hold_ms FROM control")
            .fetch_one(&mut *tx)
            .await
            .map_err(ClaimError::database)?;
        for _ in 0..if fail { 2 } else { 1 } {
            sqlx::query("INSERT INTO ledger (key) VALUES ($1)")
                .bind(&key)
                .execute(&mut *tx)
                .await
                .map_err(ClaimError::database)?;
        }
        let response = claim
            .respond_in(&mut *tx, (StatusCode::CREATED, format!("paid {key}")))
            .await?;
        tokio::time::sleep(Duration::from_millis(hold as u64)).await;
        tx.commit().await.map_err(ClaimError::database)?;
        Ok(response)
    } else {
        let pool = app.pg.as_ref().unwrap();
        let mut client = pool.get().await.map_err(ClaimError::database)?;
        let tx = client.transaction().await.map_err(ClaimError::database)?;
        let row = tx
            .query_one("SELECT fail_commit, hold_ms FROM control", &[])
            .await
            .map_err(ClaimError::database)?;
        let (fail, hold): (bool, i32) = (row.get(0), row.get(1));
        for _ in 0..if fail { 2 } else { 1 } {
            tx.execute("INSERT INTO ledger (key) VALUES ($1)", &[&key])
                .await
                .map_err(ClaimError::database)?;
        }
        let response = claim
            .respond_in(&tx, (StatusCode::CREATED, format!("paid {key}")))
            .await?;
        tokio::time::sleep(Duration::from_millis(hold as u64)).await;
        tx.commit().await.map_err(ClaimError::database)?;
        Ok(response)
    }
}

async fn claim_app(kind: Kind, url: &str, lease: Duration) -> (Store, ClaimApp, Served) {
    let store = Store::open(kind, url).await;
    store.migrate().await.unwrap();
    let app = match &store {
        Store::Pg(s) => ClaimApp {
            runs: Runs::default(),
            sqlx: None,
            pg: Some(s.pool().clone()),
        },
        Store::Sqlx(s) => ClaimApp {
            runs: Runs::default(),
            sqlx: Some(s.pool().clone()),
            pg: None,
        },
    };
    let router = Router::new()
        .route("/pay", post(claim_handler))
        .with_state(app.clone());
    let router = store.layer_app(router, |c| LayerCfg { lease, ..c });
    (store, app, serve(router).await)
}

async fn set_control(pg: &Pg, fail: bool, hold_ms: i32) {
    pg.exec(
        "app",
        &format!("UPDATE control SET fail_commit = {fail}, hold_ms = {hold_ms}"),
    )
    .await;
}

/// The handler's own COMMIT fails (a deferred constraint) after `respond_in`: the record does
/// not say done, the retry runs and commits once, the next retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_fails_is_released_and_runs_again() {
    let Some(pg) = Pg::start("a_claim_whose_commit_fails_is_released_and_runs_again", "").await
    else {
        return;
    };
    pg.exec("app", LEDGER).await;
    for kind in KINDS {
        pg.exec("app", "TRUNCATE ledger").await;
        let (_store, app, served) =
            claim_app(kind, &pg.url("postgres", "app"), Duration::from_secs(3)).await;
        set_control(&pg, true, 0).await;
        let key = format!("commit-fails-{kind:?}");
        let failed = served.send(req(&key, "p")).await;
        assert_eq!(
            failed.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{kind:?}: {failed:?}"
        );
        assert_eq!(pg.count("SELECT count(*) FROM ledger").await, 0);
        // Not done: no completed row (released, or at most in flight).
        let completed = pg
            .count(&format!(
                "SELECT count(*) FROM idempotency_records WHERE key = '{key}' AND state = 'completed'"
            ))
            .await;
        assert_eq!(completed, 0, "{kind:?}: the record says done");
        set_control(&pg, false, 0).await;
        let retry = served.send(req(&key, "p")).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{kind:?}: {retry:?}");
        assert!(!retry.replayed());
        let again = served.send(req(&key, "p")).await;
        again.assert_replay_of(&retry);
        assert_eq!(app.runs.get(), 2);
        assert_eq!(
            pg.count(&format!("SELECT count(*) FROM ledger WHERE key = '{key}'"))
                .await,
            1
        );
    }
}

/// `idle_in_transaction_session_timeout` (on the role) shorter than a handler's pause between
/// `respond_in` and COMMIT: the server ends the connection, the COMMIT fails, the record is not
/// done, the retry runs once; duplicates meanwhile get 409, never a second concurrent run. A
/// `statement_timeout` and `lock_timeout` on the role too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_ended_by_the_roles_idle_in_transaction_timeout_runs_again_once() {
    let Some(pg) = Pg::start(
        "a_claim_ended_by_the_roles_idle_in_transaction_timeout_runs_again_once",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec("app", LEDGER).await;
    pg.exec(
        "postgres",
        "CREATE ROLE ops LOGIN SUPERUSER;
         ALTER ROLE ops SET statement_timeout = '200ms';
         ALTER ROLE ops SET lock_timeout = '100ms';
         ALTER ROLE ops SET idle_in_transaction_session_timeout = '300ms';",
    )
    .await;
    for kind in KINDS {
        pg.exec("app", "TRUNCATE ledger").await;
        let (_store, app, served) =
            claim_app(kind, &pg.url("ops", "app"), Duration::from_millis(600)).await;
        let served = Arc::new(served);
        set_control(&pg, false, 1200).await;
        let key = format!("idle-{kind:?}");
        let first = {
            let served = served.clone();
            let key = key.clone();
            tokio::spawn(async move { served.send(req(&key, "p")).await })
        };
        // Duplicates while the transaction holds the row, past the lease.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            let dup = served.send(req(&key, "p")).await;
            dup.assert_in_progress();
        }
        let first = first.await.unwrap();
        assert_eq!(
            first.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{kind:?}: {first:?}"
        );
        assert_eq!(pg.count("SELECT count(*) FROM ledger").await, 0);
        set_control(&pg, false, 0).await;
        let mut done = None;
        for _ in 0..50 {
            let r = served.send(req(&key, "p")).await;
            if r.status == StatusCode::CONFLICT {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            done = Some(r);
            break;
        }
        let done = done.unwrap();
        assert_eq!(done.status, StatusCode::CREATED, "{kind:?}: {done:?}");
        served.send(req(&key, "p")).await.assert_replay_of(&done);
        assert_eq!(app.runs.get(), 2, "{kind:?}");
        assert_eq!(pg.count("SELECT count(*) FROM ledger").await, 1);
    }
}

/// PostgreSQL restarted while a Claim handler's transaction is open: its COMMIT fails, nothing
/// is done, the retry runs once after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_open_across_a_restart_runs_once_after_it() {
    let Some(pg) = Pg::start("a_claim_open_across_a_restart_runs_once_after_it", "").await else {
        return;
    };
    pg.exec("app", LEDGER).await;
    for kind in KINDS {
        for mode in ["fast", "immediate"] {
            pg.exec("app", "TRUNCATE ledger").await;
            let (_store, app, served) =
                claim_app(kind, &pg.url("postgres", "app"), Duration::from_secs(2)).await;
            let served = Arc::new(served);
            set_control(&pg, false, 1500).await;
            let key = format!("claim-restart-{kind:?}-{mode}");
            let first = {
                let served = served.clone();
                let key = key.clone();
                tokio::spawn(async move { served.send(req(&key, "p")).await })
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            pg.stop(mode);
            pg.ctl_start();
            let first = first.await.unwrap();
            assert!(
                first.status == StatusCode::SERVICE_UNAVAILABLE,
                "{kind:?} {mode}: {first:?}"
            );
            set_control(&pg, false, 0).await;
            let mut done = None;
            for _ in 0..100 {
                let r = served.send(req(&key, "p")).await;
                if r.status == StatusCode::CONFLICT || r.status == StatusCode::SERVICE_UNAVAILABLE {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                done = Some(r);
                break;
            }
            let done = done.unwrap_or_else(|| panic!("{kind:?} {mode}: never ran again"));
            assert_eq!(
                done.status,
                StatusCode::CREATED,
                "{kind:?} {mode}: {done:?}"
            );
            served.send(req(&key, "p")).await.assert_replay_of(&done);
            assert_eq!(
                pg.count(&format!("SELECT count(*) FROM ledger WHERE key = '{key}'"))
                    .await,
                1
            );
            assert_eq!(app.runs.get(), 2);
        }
    }
}

// --- Capacity ----------------------------------------------------------------------------------

/// `max_connections` exhausted by other clients: new store connections fail; answers are 503
/// problem+json within the store timeout, the handler does not run; once the clients leave,
/// requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_connections_answers_503_then_recovers() {
    let Some(pg) = Pg::start(
        "a_server_out_of_connections_answers_503_then_recovers",
        "max_connections = 12\nsuperuser_reserved_connections = 2",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "postgres",
        "CREATE ROLE app_rt LOGIN; GRANT ALL ON SCHEMA public TO app_rt;
         ALTER DATABASE app OWNER TO app_rt",
    )
    .await;
    for kind in KINDS {
        let (_store, p, served) = plain_app(kind, &pg.url("app_rt", "app"), |c| c).await;
        let served = Arc::new(served);
        // Other clients take every slot left.
        let mut hogs = Vec::new();
        let url = pg.url("app_rt", "app");
        while let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            hogs.push(c);
        }
        p.delay.store(200, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let served = served.clone();
                tokio::spawn(async move { served.send(req(&format!("full-{i}"), "f")).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            if r.status != StatusCode::CREATED {
                assert_eq!(
                    problem(&r),
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idempotency_store_unavailable".into()
                    ),
                    "{kind:?}"
                );
            }
            statuses.push(r.status);
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{kind:?}: {:?}",
            started.elapsed()
        );
        let ok = statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count();
        assert!(p.runs.get() >= ok);
        eprintln!(
            "{kind:?}: with the server full, {:?}",
            count_statuses(&statuses)
        );
        drop(hogs);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = served.send(req(&format!("after-full-{kind:?}"), "f")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{kind:?}: {r:?}");
        // Every 503 key can run now, once.
        for i in 0..20 {
            let r = served.send(req(&format!("full-{i}"), "f")).await;
            assert!(r.status == StatusCode::CREATED, "{kind:?}: {r:?}");
        }
        // Cleanup between kinds: the keys are the same.
        pg.exec("app", "DROP TABLE idempotency_records").await;
    }
}

/// A pool far smaller than the concurrent requests: one run per key, 409 for duplicates, no
/// 503 beyond the store timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_runs_each_key_once_under_concurrency() {
    let Some(pg) = Pg::start("a_small_pool_runs_each_key_once_under_concurrency", "").await else {
        return;
    };
    let url = pg.url("postgres", "app");
    let stores = [
        Store::Pg(
            PostgresStore::builder()
                .max_connections(2)
                .connect(&url)
                .await
                .unwrap(),
        ),
        Store::Sqlx(SqlxStore::new(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await
                .unwrap(),
        )),
    ];
    for store in stores {
        store.migrate().await.unwrap();
        let p = Plain::default();
        p.delay.store(300, Ordering::SeqCst);
        let served = Arc::new(serve(store.layer_app(plain_router(&p), |c| c)).await);
        let tasks: Vec<_> = (0..120)
            .map(|i| {
                let served = served.clone();
                tokio::spawn(async move {
                    (
                        i % 40,
                        served.send(req(&format!("small-{}", i % 40), "s")).await,
                    )
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            let (_, r) = t.await.unwrap();
            if r.status.as_u16() >= 400 {
                r.code();
            }
            statuses.push(r.status);
        }
        assert!(p.runs.get() <= 40);
        eprintln!("small pool: {:?}", count_statuses(&statuses));
        pg.exec("app", "DROP TABLE idempotency_records").await;
    }
}

// --- Bytes -----------------------------------------------------------------------------------

/// Bodies with NUL bytes and invalid UTF-8, response header values with obs-text bytes, many
/// headers, and a response at the response cap: stored in PostgreSQL and replayed byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_stored_and_replayed_exactly() {
    let Some(pg) = Pg::start("bytes_are_stored_and_replayed_exactly", "").await else {
        return;
    };
    const CAP: usize = 4 * 1024 * 1024;
    for kind in KINDS {
        let store = Store::open(kind, &pg.url("postgres", "app")).await;
        store.migrate().await.unwrap();
        let runs = Runs::default();
        let r2 = runs.clone();
        let router = Router::new().route(
            "/pay",
            post(move |body: axum::body::Bytes| {
                let runs = r2.clone();
                async move {
                    runs.bump();
                    let mut resp = if body.first() == Some(&b'B') {
                        // As large as the cap allows.
                        let big: Vec<u8> = (0..CAP).map(|i| (i % 251) as u8).collect();
                        (StatusCode::OK, big).into_response()
                    } else {
                        let mut b = vec![0u8, 0xff, 0xfe, 0xc0, 0x80, b'\n', 0];
                        b.extend_from_slice(&body);
                        (StatusCode::CREATED, b).into_response()
                    };
                    let h = resp.headers_mut();
                    h.insert(
                        "x-obs",
                        HeaderValue::from_bytes(&[b'a', 0x80, 0xff, b' ', 0xe9]).unwrap(),
                    );
                    // hyper's client reads at most 100 headers.
                    for i in 0..90 {
                        h.append(
                            HeaderName::from_bytes(format!("x-h{}", i % 45).as_bytes()).unwrap(),
                            HeaderValue::from_str(&format!("v{i}")).unwrap(),
                        );
                    }
                    resp
                }
            }),
        );
        let router = router.layer(axum::extract::DefaultBodyLimit::disable());
        let served = serve(store.layer_app(router, |c| LayerCfg {
            max_response: Some(CAP),
            ..c
        }))
        .await;
        let mut nul_body = vec![b'x', 0, 0xff, 0xfe, 0, 0xc3, 0x28];
        nul_body.extend((0..=255u8).collect::<Vec<_>>());
        for (key, body) in [
            (format!("bytes-{kind:?}"), nul_body.clone()),
            (format!("big-{kind:?}"), {
                let mut b = vec![b'B'];
                b.extend(std::iter::repeat_n(0u8, CAP - 1));
                b
            }),
        ] {
            let first = served.send(req(&key, body.clone())).await;
            assert!(first.status.is_success(), "{kind:?}: {:?}", first.status);
            let replay = served.send(req(&key, body.clone())).await;
            replay.assert_replay_of(&first);
            // Another body with the same key: 422.
            let mut other = body.clone();
            other[1] ^= 1;
            let reuse = served.send(req(&key, other)).await;
            assert_eq!(
                problem(&reuse),
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reuse".into()
                )
            );
        }
        assert_eq!(runs.get(), 2, "{kind:?}");
    }
}

// --- Expiry and clocks -------------------------------------------------------------------------

/// Records past their TTL are reclaimed (the key runs again, once) and deleted by
/// `delete_expired`; two app servers whose connections have different time zones share the same
/// records and expiries: the database's clock decides, not the app's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_cleanup_follow_the_databases_clock() {
    let Some(pg) = Pg::start("expiry_and_cleanup_follow_the_databases_clock", "").await else {
        return;
    };
    pg.exec(
        "postgres",
        "CREATE ROLE east LOGIN SUPERUSER; ALTER ROLE east SET timezone = 'Pacific/Kiritimati';
         CREATE ROLE west LOGIN SUPERUSER; ALTER ROLE west SET timezone = 'Etc/GMT+12';",
    )
    .await;
    let a = Store::open(Kind::Postgres, &pg.url("east", "app")).await;
    let b = Store::open(Kind::Sqlx, &pg.url("west", "app")).await;
    a.migrate().await.unwrap();
    let p = Plain::default();
    let ttl = |c: LayerCfg| LayerCfg {
        ttl: Duration::from_millis(1500),
        ..c
    };
    let sa = serve(a.layer_app(plain_router(&p), ttl)).await;
    let sb = serve(b.layer_app(plain_router(&p), ttl)).await;
    let first = sa.send(req("exp-1", "e")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    sb.send(req("exp-1", "e")).await.assert_replay_of(&first);
    assert_eq!(p.runs.get(), 1);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let again = sb.send(req("exp-1", "e")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed());
    assert_eq!(p.runs.get(), 2);
    sa.send(req("exp-1", "e")).await.assert_replay_of(&again);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let Store::Pg(pa) = &a else { unreachable!() };
    assert_eq!(pa.delete_expired().await.unwrap(), 1);
    assert_eq!(
        pg.count("SELECT count(*) FROM idempotency_records").await,
        0
    );
}

// --- search_path and errors ------------------------------------------------------------------

/// Two servers of one fleet whose roles resolve names through different `search_path`s
/// (PostgreSQL's default `"$user", public`, and a schema named after one of the roles). The
/// default table name is unqualified: each connection resolves it, and the two servers would keep
/// a table each. With a schema-qualified name, as the store's documentation asks of such a
/// fleet, they share one table, and a key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_qualified_table_is_one_truth_across_search_paths() {
    let Some(pg) = Pg::start(
        "a_schema_qualified_table_is_one_truth_across_search_paths",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "app",
        "CREATE ROLE alpha LOGIN SUPERUSER; CREATE ROLE beta LOGIN SUPERUSER;
         CREATE SCHEMA alpha AUTHORIZATION alpha;",
    )
    .await;
    let tables = "SELECT count(*) FROM pg_class WHERE relname = 'idempotency_records'";
    // The default name: alpha's resolves to its own schema, beta's to `public`.
    for (role, kind) in [("alpha", Kind::Postgres), ("beta", Kind::Sqlx)] {
        let store = Store::open(kind, &pg.url(role, "app")).await;
        store.migrate().await.unwrap();
    }
    assert_eq!(pg.count(tables).await, 2, "one table per search_path");
    pg.exec(
        "app",
        "DROP TABLE alpha.idempotency_records; DROP TABLE public.idempotency_records;",
    )
    .await;

    let qualified = "public.idempotency_records";
    let a = Store::Pg(
        PostgresStore::builder()
            .table(qualified)
            .connect(&pg.url("alpha", "app"))
            .await
            .unwrap(),
    );
    let pool = sqlx::PgPool::connect(&pg.url("beta", "app")).await.unwrap();
    let b = Store::Sqlx(SqlxStore::builder(pool).table(qualified).build().unwrap());
    a.migrate().await.unwrap();
    b.migrate().await.unwrap();
    assert_eq!(pg.count(tables).await, 1);
    let p = Plain::default();
    let sa = serve(a.layer_app(plain_router(&p), |c| c)).await;
    let sb = serve(b.layer_app(plain_router(&p), |c| c)).await;
    let first = sa.send(req("split-1", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    sb.send(req("split-1", "x")).await.assert_replay_of(&first);
    let first = sb.send(req("split-2", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    sa.send(req("split-2", "x")).await.assert_replay_of(&first);
    assert_eq!(p.runs.get(), 2);
}

/// A `ClaimError` a handler returns (here: its COMMIT failed on a constraint) reaches the
/// client as the crate's other errors do: problem+json, without the database's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_error_reaches_the_client_as_problem_json() {
    let Some(pg) = Pg::start("a_claim_error_reaches_the_client_as_problem_json", "").await else {
        return;
    };
    pg.exec("app", LEDGER).await;
    let mut wrong = Vec::new();
    for kind in KINDS {
        let (_store, _app, served) =
            claim_app(kind, &pg.url("postgres", "app"), Duration::from_secs(3)).await;
        set_control(&pg, true, 0).await;
        let r = served.send(req(&format!("claim-err-{kind:?}"), "p")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers.contains_key("retry-after"));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        if r.header("content-type") != Some("application/problem+json") || body.contains("ledger") {
            wrong.push(format!("{kind:?}: {:?} {body:?}", r.header("content-type")));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Claim handlers at SERIALIZABLE whose transactions write-skew (each counts the ledger, then
/// inserts): PostgreSQL fails some with 40001 (at a statement or at COMMIT). Each failed one is
/// released (never done), its retry runs; at the end every key has exactly one ledger row and
/// a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_fail_to_serialize_are_released_and_run_once() {
    let Some(pg) = Pg::start(
        "claims_that_fail_to_serialize_are_released_and_run_once",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec("app", LEDGER).await;
    for kind in KINDS {
        pg.exec("app", "TRUNCATE ledger").await;
        let store = Store::open(kind, &pg.url("postgres", "app")).await;
        store.migrate().await.unwrap();
        let runs = Runs::default();
        let (sqlx_pool, pg_pool) = match &store {
            Store::Pg(s) => (None, Some(s.pool().clone())),
            Store::Sqlx(s) => (Some(s.pool().clone()), None),
        };
        let r2 = runs.clone();
        let handler = move |claim: Claim, headers: axum::http::HeaderMap| {
            let (runs, sqlx_pool, pg_pool) = (r2.clone(), sqlx_pool.clone(), pg_pool.clone());
            async move {
                runs.bump();
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                let body = (StatusCode::CREATED, format!("paid {key}"));
                if let Some(pool) = sqlx_pool {
                    let mut tx = pool.begin().await.map_err(ClaimError::database)?;
                    sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                        .execute(&mut *tx)
                        .await
                        .map_err(ClaimError::database)?;
                    let _: (i64,) = sqlx::query_as("SELECT count(*) FROM ledger")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(ClaimError::database)?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    sqlx::query("INSERT INTO ledger (key) VALUES ($1)")
                        .bind(&key)
                        .execute(&mut *tx)
                        .await
                        .map_err(ClaimError::database)?;
                    let response = claim.respond_in(&mut *tx, body).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.commit().await.map_err(ClaimError::database)?;
                    Ok::<Response, ClaimError>(response)
                } else {
                    let pool = pg_pool.unwrap();
                    let mut client = pool.get().await.map_err(ClaimError::database)?;
                    let tx = client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
                        .start()
                        .await
                        .map_err(ClaimError::database)?;
                    tx.query_one("SELECT count(*) FROM ledger", &[])
                        .await
                        .map_err(ClaimError::database)?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.execute("INSERT INTO ledger (key) VALUES ($1)", &[&key])
                        .await
                        .map_err(ClaimError::database)?;
                    let response = claim.respond_in(&tx, body).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.commit().await.map_err(ClaimError::database)?;
                    Ok(response)
                }
            }
        };
        let router = Router::new().route("/pay", post(handler));
        let served = Arc::new(serve(store.layer_app(router, |c| c)).await);
        let keys: Vec<String> = (0..6).map(|i| format!("ser-claim-{kind:?}-{i}")).collect();
        let mut failures = 0;
        for _round in 0..20 {
            let tasks: Vec<_> = keys
                .iter()
                .map(|k| {
                    let served = served.clone();
                    let k = k.clone();
                    tokio::spawn(async move { served.send(req(&k, "s")).await })
                })
                .collect();
            let mut pending = false;
            for t in tasks {
                let r = t.await.unwrap();
                match r.status {
                    StatusCode::CREATED => {}
                    StatusCode::SERVICE_UNAVAILABLE => {
                        failures += 1;
                        pending = true;
                    }
                    StatusCode::CONFLICT => pending = true,
                    other => panic!("{kind:?}: {other} {r:?}"),
                }
            }
            if !pending {
                break;
            }
        }
        assert!(
            failures > 0,
            "{kind:?}: no serialization failure was provoked"
        );
        for k in &keys {
            let r = served.send(req(k, "s")).await;
            assert!(r.replayed(), "{kind:?} {k}: {r:?}");
            assert_eq!(
                pg.count(&format!("SELECT count(*) FROM ledger WHERE key = '{k}'"))
                    .await,
                1,
                "{kind:?} {k}"
            );
        }
        eprintln!(
            "{kind:?}: {failures} serialization failures, {} runs",
            runs.get()
        );
    }
}

/// `lock_timeout` and `statement_timeout` on the role (as operations teams set to keep DDL
/// from queueing traffic), a fleet of instances starting at once on an empty database: every
/// `migrate` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_migrate_at_once_under_a_role_lock_timeout() {
    let Some(pg) = Pg::start(
        "many_instances_migrate_at_once_under_a_role_lock_timeout",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "postgres",
        "CREATE ROLE ops LOGIN SUPERUSER;
         ALTER ROLE ops SET lock_timeout = '100ms';
         ALTER ROLE ops SET statement_timeout = '1s';",
    )
    .await;
    let url = pg.url("ops", "app");
    let mut errors = Vec::new();
    for _round in 0..8 {
        pg.exec("app", "DROP TABLE IF EXISTS idempotency_records")
            .await;
        let mut stores = Vec::new();
        for i in 0..6 {
            stores.push(Store::open(KINDS[i % 2], &url).await);
        }
        let tasks: Vec<_> = stores
            .into_iter()
            .map(|s| tokio::spawn(async move { s.migrate().await }))
            .collect();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                errors.push(e.to_string());
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} failed: {:?}; server: {:?}",
        errors.len(),
        errors.first(),
        pg.errors()
    );
}

/// What an operator reads in the logs (`error = %err` of the layer's `tracing` warning, the
/// error `migrate` returns): the database's message and SQLSTATE, for both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_carry_the_databases_message() {
    let Some(pg) = Pg::start("store_errors_carry_the_databases_message", "").await else {
        return;
    };
    let url = pg.url("postgres", "app");
    let mut opaque = Vec::new();
    for kind in KINDS {
        let err = match kind {
            Kind::Postgres => PostgresStore::builder()
                .table("no_such_schema.records")
                .connect(&url)
                .await
                .unwrap()
                .migrate()
                .await
                .unwrap_err(),
            Kind::Sqlx => SqlxStore::builder(sqlx::PgPool::connect(&url).await.unwrap())
                .table("no_such_schema.records")
                .build()
                .unwrap()
                .migrate()
                .await
                .unwrap_err(),
        };
        let text = err.to_string();
        if !text.contains("no_such_schema") || !text.contains("(SQLSTATE 3F000)") {
            opaque.push(format!("{kind:?}: {text:?}"));
        }
    }
    assert!(opaque.is_empty(), "{opaque:?}");
}

/// Raw bytes on the wire: a key with obs-text (invalid UTF-8) or a NUL is refused before the
/// store (400, no run); a credential (the tenant) with invalid UTF-8 bytes is scoped, stored
/// and replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_keys_are_refused_and_raw_tenants_are_scoped() {
    let Some(pg) = Pg::start("raw_keys_are_refused_and_raw_tenants_are_scoped", "").await else {
        return;
    };
    for kind in KINDS {
        let (_store, p, served) = plain_app(kind, &pg.url("postgres", "app"), |c| c).await;
        let raw = |auth: &[u8], key: &[u8], body: &[u8]| {
            let mut r =
                b"POST /pay HTTP/1.1\r\nhost: t\r\nconnection: close\r\nauthorization: ".to_vec();
            r.extend_from_slice(auth);
            r.extend_from_slice(b"\r\nidempotency-key: ");
            r.extend_from_slice(key);
            r.extend_from_slice(format!("\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes());
            r.extend_from_slice(body);
            r
        };
        let bad = support::raw::exchange(served.addr, raw(b"Bearer a", b"k\xff\xfe", b"x")).await;
        assert_eq!(bad.status, 400, "{bad:?}");
        assert!(bad.text().contains("idempotency_key_invalid"), "{bad:?}");
        // A NUL in a header is not HTTP: hyper refuses the request (no run either way).
        let nul = support::raw::try_exchange(served.addr, raw(b"Bearer a", b"k\0k", b"x")).await;
        assert!(nul.as_ref().is_none_or(|r| r.status == 400), "{nul:?}");
        assert_eq!(p.runs.get(), 0);
        let key = format!("utf8-{kind:?}");
        let body = b"\0\xff\xc3\x28\0";
        let first = support::raw::exchange(
            served.addr,
            raw(b"Bearer \xff\xfe\x80", key.as_bytes(), body),
        )
        .await;
        assert_eq!(first.status, 201, "{first:?}");
        let again = support::raw::exchange(
            served.addr,
            raw(b"Bearer \xff\xfe\x80", key.as_bytes(), body),
        )
        .await;
        assert!(again.replayed(), "{again:?}");
        assert_eq!(again.body, first.body);
        // Another credential: another scope, the handler runs.
        let other = support::raw::exchange(
            served.addr,
            raw(b"Bearer \xff\xfe\x81", key.as_bytes(), body),
        )
        .await;
        assert_eq!(other.status, 201);
        assert!(!other.replayed());
        assert_eq!(p.runs.get(), 2);
    }
}

/// PostgreSQL down for several seconds, then back: every request meanwhile answers 503
/// problem+json within the store timeout (never hangs), no handler runs; once it is back the
/// store reconnects by itself. Then `idle_session_timeout` on the role (the server closes idle
/// pool connections): requests spaced past it are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_answers_503_then_recovers_and_idle_connections_are_replaced() {
    let Some(pg) = Pg::start(
        "an_unreachable_database_answers_503_then_recovers_and_idle_connections_are_replaced",
        "",
    )
    .await
    else {
        return;
    };
    pg.exec(
        "postgres",
        "CREATE ROLE ops LOGIN SUPERUSER; ALTER ROLE ops SET idle_session_timeout = '300ms';",
    )
    .await;
    for kind in KINDS {
        let (_store, p, served) = plain_app(kind, &pg.url("ops", "app"), |c| c).await;
        assert_eq!(
            served.send(req(&format!("up-{kind:?}"), "u")).await.status,
            StatusCode::CREATED
        );
        pg.stop("fast");
        for i in 0..6 {
            let t0 = std::time::Instant::now();
            let r = served.send(req(&format!("down-{kind:?}-{i}"), "u")).await;
            assert!(
                t0.elapsed() < Duration::from_millis(2600),
                "{kind:?}: {:?}",
                t0.elapsed()
            );
            r.assert_store_unavailable();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(p.runs.get(), 1);
        pg.ctl_start();
        let back = support::eventually(Duration::from_secs(5), async || {
            served
                .send(req(&format!("down-{kind:?}-0"), "u"))
                .await
                .status
                == StatusCode::CREATED
        })
        .await;
        assert!(back, "{kind:?}: the store did not come back");
        // Idle connections closed by the server between requests.
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = served.send(req(&format!("idle-{kind:?}-{i}"), "u")).await;
            assert_eq!(r.status, StatusCode::CREATED, "{kind:?} after idle: {r:?}");
        }
    }
}
