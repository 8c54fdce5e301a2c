//! `RedisStore` on Redis run the way security-minded operations teams run it: ACL users
//! restricted to the store's prefix and commands, renamed or disabled commands, credentials and
//! database numbers in the URL, a node demoted to replica (`READONLY`), a restart that loads a
//! large dataset (`LOADING`), and key prefixes that overlap. Each case on Redis servers of its
//! own (`REDIS_SERVER_BIN`), through a real axum server on loopback, with handler runs counted.
//!
//! Run: `scripts/test-services cargo test --all-features --test redis_acl`.
#![cfg(all(feature = "redis", feature = "conformance"))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::cluster::{Node, node_command};
use support::*;
use tower_idempotency::{Fingerprint, IdempotencyStore, RecordKey, RedisStore, TenantId};

fn bin(test: &str) -> Option<String> {
    server_url("REDIS_SERVER_BIN", test)
}

async fn cmd(url: &str, args: &[&str]) -> String {
    node_command(url, args).await.unwrap()
}

/// The commands the store needs on one Redis 7 node: the calls themselves and what the scripts
/// call (`PEXPIRETIME` in `lookup`, through `pcall`; `TIME` and
/// `PTTL` are its fallback before Redis 7).
const MINIMAL: &[&str] = &[
    "+evalsha",
    "+eval",
    "+getrange",
    "+set",
    "+pexpire",
    "+get",
    "+del",
    "+pexpiretime",
];

/// [`MINIMAL`] less `command`.
fn minimal_without(command: &str) -> Vec<&'static str> {
    MINIMAL.iter().copied().filter(|c| *c != command).collect()
}

/// `ACL SETUSER name reset on >password rules...` on the node at `admin`.
async fn set_user(admin: &str, name: &str, password: &str, rules: &[&str]) {
    let pass = format!(">{password}");
    let mut args = vec!["ACL", "SETUSER", name, "reset", "on", pass.as_str()];
    args.extend_from_slice(rules);
    assert!(
        cmd(admin, &args).await.eq_ignore_ascii_case("ok"),
        "ACL SETUSER {args:?}"
    );
}

/// The ACL rules of a user limited to `prefix` and `commands`.
fn rules<'a>(pattern: &'a str, commands: &[&'a str]) -> Vec<&'a str> {
    let mut rules = vec![pattern, "-@all"];
    rules.extend_from_slice(commands);
    rules
}

/// One store call's error text on a fresh key, or `None` when `begin` succeeded.
async fn begin_error(store: &RedisStore) -> Option<String> {
    let key = RecordKey::new(TenantId::shared(), unique_key("probe"));
    match store
        .begin(
            &key,
            &Fingerprint::from_bytes([7; 32]),
            Duration::from_secs(5),
        )
        .await
    {
        Ok(_) => None,
        Err(err) => Some(format!("{:?}: {err}", err.kind())),
    }
}

/// A short lifecycle of every call: begin, renew, complete, replay, lookup, forget, and begin,
/// release. `Err` names the first call that failed, with its error.
async fn lifecycle(store: &RedisStore) -> Result<(), String> {
    use tower_idempotency::{Begin, StoredResponse};
    let fp = Fingerprint::from_bytes([3; 32]);
    let lease = Duration::from_secs(5);
    let key = RecordKey::new(TenantId::shared(), unique_key("life"));
    let token = match store.begin(&key, &fp, lease).await {
        Ok(Begin::Acquired(token)) => token,
        other => return Err(format!("begin: {other:?}")),
    };
    store
        .renew(&key, token, lease)
        .await
        .map_err(|e| format!("renew: {e}"))?;
    let response = StoredResponse::new(StatusCode::CREATED, Default::default(), "ok".into());
    store
        .complete(&key, token, response, Duration::from_secs(60))
        .await
        .map_err(|e| format!("complete: {e}"))?;
    match store.begin(&key, &fp, lease).await {
        Ok(Begin::Completed(_)) => {}
        other => return Err(format!("replay: {other:?}")),
    }
    store
        .lookup(&key)
        .await
        .map_err(|e| format!("lookup: {e}"))?;
    store
        .forget(&key, false)
        .await
        .map_err(|e| format!("forget: {e}"))?;
    let token = match store.begin(&key, &fp, lease).await {
        Ok(Begin::Acquired(token)) => token,
        other => return Err(format!("begin again: {other:?}")),
    };
    store
        .release(&key, token)
        .await
        .map_err(|e| format!("release: {e}"))?;
    Ok(())
}

/// A store on `url` made without `connect`'s `SCRIPT LOAD`: the application's own connection
/// manager (`RedisStore::new`), as the docs offer for other settings.
async fn store_over_manager(url: &str) -> RedisStore {
    let client = redis::Client::open(url).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    RedisStore::new(manager)
}

// ---------------------------------------------------------------------------------------------
// ACL users
// ---------------------------------------------------------------------------------------------

/// A user limited to `~idempotency:*` and the eight commands of [`MINIMAL`] runs the whole
/// conformance suite and the API (create, replay, 422, 409). Each command is needed: without any
/// one of them some call fails (at `connect`, or the call that uses it), with a clear error and
/// never a panic; `+pexpiretime` may be replaced by `+time +pttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minimal_acl_user_runs_everything_and_each_command_is_needed() {
    let Some(bin) = bin("minimal_acl") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let admin = node.url();
    let url = format!("redis://idem:idem-pw@127.0.0.1:{}", node.port);
    set_user(&admin, "idem", "idem-pw", &rules("~idempotency:*", MINIMAL)).await;
    let store = RedisStore::connect(&url).await.unwrap();
    tower_idempotency::conformance::run_all(store.clone()).await;
    lifecycle(&store).await.unwrap();

    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::from_millis(400), |l| l);
    let served = Arc::new(serve(app).await);
    let first = served.send(payment("acl-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    served
        .send(payment("acl-1", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(
        served.send(payment("acl-1", r#"{"a":1}"#)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let s2 = served.clone();
    let slow = tokio::spawn(async move { s2.send(payment("acl-2", "{}")).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    served
        .send(payment("acl-2", "{}"))
        .await
        .assert_in_progress();
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);

    // Each command taken away in turn.
    let mut needed = Vec::new();
    for skip in MINIMAL {
        let commands = minimal_without(skip);
        set_user(
            &admin,
            "idem",
            "idem-pw",
            &rules("~idempotency:*", &commands),
        )
        .await;
        let outcome = match RedisStore::connect(&url).await {
            Err(err) => format!("connect: {err}"),
            // As after a restart or a failover: the node does not know the scripts.
            Ok(store) => match async {
                cmd(&admin, &["SCRIPT", "FLUSH"]).await;
                lifecycle(&store).await
            }
            .await
            {
                Ok(()) => "everything works".to_owned(),
                Err(err) => err,
            },
        };
        eprintln!("without {skip}: {outcome}");
        if outcome != "everything works" {
            needed.push(*skip);
        }
    }
    assert_eq!(needed, MINIMAL, "each command is needed");
    // PEXPIRETIME's fallback.
    let mut commands = minimal_without("+pexpiretime");
    commands.extend(["+time", "+pttl"]);
    set_user(
        &admin,
        "idem",
        "idem-pw",
        &rules("~idempotency:*", &commands),
    )
    .await;
    lifecycle(&RedisStore::connect(&url).await.unwrap())
        .await
        .unwrap();
}

/// No store call needs `SCRIPT LOAD`: every call is `EVALSHA`, and a node that lacks a script
/// gets it from `EVAL` on `NOSCRIPT`. So a user granted exactly what the calls run (`+evalsha
/// +eval` and the scripts' commands), and a Redis where `SCRIPT` is renamed or disabled
/// (`rename-command SCRIPT ""`, as hosted and hardened Redis do with administrative commands),
/// connect and run every call, as a store made over the application's own connection manager
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_needs_no_script_load() {
    let Some(bin) = bin("script_load") else {
        return;
    };
    // An ACL user with the calls' commands alone: no `script|load`.
    let node = Node::start(&bin, &[]);
    assert!(!MINIMAL.contains(&"+script|load"));
    set_user(
        &node.url(),
        "idem",
        "idem-pw",
        &rules("~idempotency:*", MINIMAL),
    )
    .await;
    let user_url = format!("redis://idem:idem-pw@127.0.0.1:{}", node.port);
    lifecycle(&store_over_manager(&user_url).await)
        .await
        .expect("every call works without SCRIPT LOAD");
    // `SCRIPT` disabled on the server.
    let hardened = Node::start(&bin, &["--rename-command", "SCRIPT", ""]);
    lifecycle(&store_over_manager(&hardened.url()).await)
        .await
        .expect("every call works with SCRIPT disabled");

    let by_user = RedisStore::connect(&user_url).await.map(|_| ());
    let on_hardened = RedisStore::connect(&hardened.url()).await.map(|_| ());
    eprintln!("ACL user without script|load: {by_user:?}");
    eprintln!("SCRIPT disabled: {on_hardened:?}");
    assert!(
        by_user.is_ok() && on_hardened.is_ok(),
        "connect refuses servers the store works on: {by_user:?} / {on_hardened:?}"
    );
}

/// `connect` fails where no store call could succeed, rather than starting an application that
/// answers `503` to every keyed request: an ACL user whose key pattern does not cover the
/// store's prefix (`~app:*` for the default `idempotency:`), a user without `+evalsha`, a Redis
/// with `EVAL` and `EVALSHA` renamed, and a URL that names a replica. It runs one call as the
/// layer makes them, on a key under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_fails_where_every_call_would() {
    let Some(bin) = bin("connect_late") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    set_user(&node.url(), "wrongkeys", "pw", &rules("~app:*", MINIMAL)).await;
    let no_evalsha = minimal_without("+evalsha");
    set_user(
        &node.url(),
        "noevalsha",
        "pw",
        &rules("~idempotency:*", &no_evalsha),
    )
    .await;
    let renamed = Node::start(
        &bin,
        &[
            "--rename-command",
            "EVALSHA",
            "",
            "--rename-command",
            "EVAL",
            "",
        ],
    );
    let primary = Node::start(&bin, &[]);
    let replica_of = primary.port.to_string();
    let replica = Node::start(&bin, &["--replicaof", "127.0.0.1", &replica_of]);

    let cases = [
        (
            "key pattern ~app:*",
            format!("redis://wrongkeys:pw@127.0.0.1:{}", node.port),
        ),
        (
            "no +evalsha",
            format!("redis://noevalsha:pw@127.0.0.1:{}", node.port),
        ),
        ("EVAL and EVALSHA renamed", renamed.url()),
        ("URL of a replica", replica.url()),
    ];
    let mut accepted = Vec::new();
    for (what, url) in cases {
        match RedisStore::connect(&url).await {
            Err(err) => eprintln!("{what}: connect -> {err}"),
            Ok(store) => {
                let runs = Runs::default();
                let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
                let reply = served.send(payment("late-1", "{}")).await;
                reply.assert_store_unavailable();
                assert_eq!(runs.get(), 0);
                let err = begin_error(&store).await;
                eprintln!("{what}: connect -> Ok, then 503 ({err:?})");
                accepted.push(what);
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "connect accepted servers no call can succeed on: {accepted:?}"
    );
}

/// The user's ACL changed while traffic runs: the key pattern taken away, then `EVALSHA`, then
/// `SET` inside the scripts. Each answers `503 idempotency_store_unavailable` problem+json with
/// `Retry-After` (never a panic, never a run), the store's error names what the server said
/// (`NOPERM`, or the script's "can't run this command"), the client's body does not; once the
/// ACL is given back, the store works again by itself, and no key ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acl_changed_live_answers_503_with_the_servers_reason_then_recovers() {
    let Some(bin) = bin("acl_live") else { return };
    let node = Node::start(&bin, &[]);
    let admin = node.url();
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    let store = RedisStore::connect(&format!("redis://idem:pw@127.0.0.1:{}", node.port))
        .await
        .unwrap();
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    let first = served.send(payment("live-0", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let no_evalsha = minimal_without("+evalsha");
    let no_set = minimal_without("+set");
    let cases: [(&str, Vec<&str>, &str); 3] = [
        ("key pattern", rules("~other:*", MINIMAL), "NOPERM"),
        ("evalsha", rules("~idempotency:*", &no_evalsha), "NOPERM"),
        (
            "set in a script",
            rules("~idempotency:*", &no_set),
            "can't run this command",
        ),
    ];
    for (i, (what, acl, said)) in cases.iter().enumerate() {
        set_user(&admin, "idem", "pw", acl).await;
        let key = format!("live-{}", i + 1);
        let before = runs.get();
        let reply = served.send(payment(&key, "{}")).await;
        reply.assert_store_unavailable();
        let body = String::from_utf8_lossy(&reply.body).to_string();
        assert!(
            !body.contains("NOPERM") && !body.contains("script"),
            "{body}"
        );
        if *what != "set in a script" {
            // The replay of a completed key needs no write: it is refused as well.
            served
                .send(payment("live-0", "{}"))
                .await
                .assert_store_unavailable();
        }
        let err = begin_error(&store).await.expect("the call fails");
        eprintln!("{what}: {err}");
        assert!(
            err.to_lowercase().contains(&said.to_lowercase()),
            "{what}: the server's reason: {err}"
        );
        assert_eq!(runs.get(), before, "{what}: nothing ran");
        set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
        let t = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), async || {
                served.send(payment(&key, "{}")).await.status == StatusCode::CREATED
            })
            .await,
            "{what}: recovers"
        );
        eprintln!("{what}: recovered in {:?}", t.elapsed());
        assert_eq!(runs.get(), before + 1);
    }
    served
        .send(payment("live-0", "{}"))
        .await
        .assert_replay_of(&first);
}

/// `SET` taken away from the scripts while a handler runs: its client gets its response, its
/// `complete` fails (and is tried again in the background), retries get `409`; `SET` given back
/// within the background tries: the completion lands and the retry replays. One run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acl_denies_the_completion_mid_handler_then_is_restored() {
    let Some(bin) = bin("acl_mid_handler") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let admin = node.url();
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    let store = RedisStore::connect(&format!("redis://idem:pw@127.0.0.1:{}", node.port))
        .await
        .unwrap();
    let runs = Runs::default();
    let served = Arc::new(
        serve(server(
            store.clone(),
            &runs,
            Duration::from_millis(800),
            |l| l.lease(Duration::from_secs(3)),
        ))
        .await,
    );
    let s2 = served.clone();
    let first = tokio::spawn(async move { s2.send(payment("mid-1", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let no_set = minimal_without("+set");
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", &no_set)).await;
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client gets its response"
    );
    for _ in 0..3 {
        served
            .send(payment("mid-1", "{}"))
            .await
            .assert_in_progress();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    let replayed = eventually(Duration::from_secs(8), async || {
        let reply = served.send(payment("mid-1", "{}")).await;
        if reply.status == StatusCode::CONFLICT {
            return false;
        }
        reply.assert_replay_of(&first);
        true
    })
    .await;
    assert!(replayed, "the background completion landed");
    assert_eq!(runs.get(), 1);
}

/// The user deleted (`ACL DELUSER` closes its connections; reconnecting is refused with
/// `WRONGPASS`): `503`, then the user made again: the store recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acl_user_deleted_and_recreated_recovers() {
    let Some(bin) = bin("acl_deluser") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let admin = node.url();
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    let store = RedisStore::connect(&format!("redis://idem:pw@127.0.0.1:{}", node.port))
        .await
        .unwrap();
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    assert_eq!(
        served.send(payment("del-0", "{}")).await.status,
        StatusCode::CREATED
    );
    cmd(&admin, &["ACL", "DELUSER", "idem"]).await;
    for i in 0..3 {
        served
            .send(payment(&format!("del-x{i}"), "{}"))
            .await
            .assert_store_unavailable();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("user gone: {:?}", begin_error(&store).await);
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            served.send(payment("del-1", "{}")).await.status == StatusCode::CREATED
        })
        .await
    );
    assert_eq!(runs.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// URLs: user names, encoded passwords, database numbers, TLS, protected mode
// ---------------------------------------------------------------------------------------------

/// `redis://user:pass@host/3` with an ACL user (and `+select`), a password full of URL
/// characters percent-encoded, `default:` with `requirepass`, protected mode on loopback; a
/// database number the user may not `SELECT` and `rediss://` without TLS support fail at
/// `connect` with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn urls_with_users_encoded_passwords_and_databases() {
    let Some(bin) = bin("urls") else { return };
    let node = Node::start(
        &bin,
        &["--requirepass", "admin-pw", "--protected-mode", "yes"],
    );
    let admin = format!("redis://default:admin-pw@127.0.0.1:{}", node.port);
    let password = "p@ss:w/rd%?#";
    let encoded = "p%40ss%3Aw%2Frd%25%3F%23";
    let mut with_select: Vec<&str> = MINIMAL.to_vec();
    with_select.push("+select");
    set_user(
        &admin,
        "app-user",
        password,
        &rules("~idempotency:*", &with_select),
    )
    .await;
    set_user(&admin, "no-select", "pw", &rules("~idempotency:*", MINIMAL)).await;

    let db3 = format!("redis://app-user:{encoded}@127.0.0.1:{}/3", node.port);
    let store = RedisStore::connect(&db3).await.unwrap();
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    let first = served.send(payment("url-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    served
        .send(payment("url-1", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(cmd(&format!("{admin}/3"), &["DBSIZE"]).await, "1");
    assert_eq!(cmd(&admin, &["DBSIZE"]).await, "0");
    lifecycle(&RedisStore::connect(&admin).await.unwrap())
        .await
        .unwrap();

    let refused = RedisStore::connect(&format!("redis://no-select:pw@127.0.0.1:{}/3", node.port))
        .await
        .expect_err("SELECT denied");
    eprintln!("no +select: {refused}");
    assert!(refused.to_string().contains("no permissions"), "{refused}");
    let tls = RedisStore::connect(&format!("rediss://127.0.0.1:{}", node.port))
        .await
        .expect_err("no TLS support");
    eprintln!("rediss: {:?}: {tls}", tls.kind());
    assert!(tls.to_string().to_lowercase().contains("tls"), "{tls}");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// READONLY: the node the store is on demoted to replica
// ---------------------------------------------------------------------------------------------

/// Waits until the replica at `url` has a live link to its primary and has caught up.
async fn linked(url: &str) {
    let ok = eventually(Duration::from_secs(10), async || {
        cmd(url, &["INFO", "replication"])
            .await
            .contains("master_link_status:up")
    })
    .await;
    assert!(ok, "replica {url} linked");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Waits until the replica at `replica` has every write the primary at `primary` made so far
/// (their replication offsets meet): replication is asynchronous, and a write made just before
/// a failover can be lost, which the replica wait is for.
async fn caught_up(primary: &str, replica: &str) {
    let offset = |info: String, field: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(field))?;
        line[field.len()..].trim().parse().ok()
    };
    let ok = eventually(Duration::from_secs(10), async || {
        let written = offset(
            cmd(primary, &["INFO", "replication"]).await,
            "master_repl_offset:",
        );
        let copied = offset(
            cmd(replica, &["INFO", "replication"]).await,
            "slave_repl_offset:",
        );
        matches!((written, copied), (Some(w), Some(c)) if c >= w)
    })
    .await;
    assert!(ok, "replica {replica} caught up with {primary}");
}

/// A primary and its replica, linked.
async fn primary_and_replica(bin: &str) -> (Node, Node) {
    let primary = Node::start(bin, &["--repl-diskless-sync-delay", "0"]);
    let port = primary.port.to_string();
    let replica = Node::start(
        bin,
        &[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--repl-diskless-sync-delay",
            "0",
        ],
    );
    linked(&replica.url()).await;
    (primary, replica)
}

/// The node the store's URL names is demoted (`REPLICAOF` the other node, which is promoted),
/// while a handler runs and under traffic: new keys get `503` whose error says `READONLY`,
/// nothing runs; the in-flight run's completion is tried again in the background; once the
/// URL's node is primary again, the store works by itself, the completion lands, the retry
/// replays, and no key ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demoted_then_promoted_again_recovers_without_a_double_run() {
    let Some(bin) = bin("demoted") else { return };
    let (a, b) = primary_and_replica(&bin).await;
    let b_port = b.port.to_string();
    let store = RedisStore::connect(&a.url()).await.unwrap();
    let runs = Runs::default();
    let served = Arc::new(
        serve(server(
            store.clone(),
            &runs,
            Duration::from_millis(1000),
            |l| l.lease(Duration::from_secs(5)),
        ))
        .await,
    );
    let first = served.send(payment("ro-0", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let s2 = served.clone();
    let pending = tokio::spawn(async move { s2.send(payment("ro-1", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    caught_up(&a.url(), &b.url()).await;
    // Fail over to B, A demoted.
    cmd(&b.url(), &["REPLICAOF", "NO", "ONE"]).await;
    cmd(&a.url(), &["REPLICAOF", "127.0.0.1", &b_port]).await;
    linked(&a.url()).await;
    let pending = pending.await.unwrap();
    assert_eq!(pending.status, StatusCode::CREATED);
    let err = begin_error(&store).await.expect("a replica refuses");
    eprintln!("demoted: {err}");
    assert!(err.to_lowercase().contains("readonly"), "{err}");
    for i in 0..3 {
        let reply = served.send(payment(&format!("ro-x{i}"), "{}")).await;
        reply.assert_store_unavailable();
    }
    let runs_while_demoted = runs.get();
    assert_eq!(runs_while_demoted, 2);
    // A primary again (B its replica).
    cmd(&a.url(), &["REPLICAOF", "NO", "ONE"]).await;
    cmd(&b.url(), &["REPLICAOF", "127.0.0.1", &a.port.to_string()]).await;
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), async || {
            served.send(payment("ro-2", "{}")).await.status == StatusCode::CREATED
        })
        .await,
        "recovers once the URL's node is primary"
    );
    eprintln!("recovered in {:?}", t.elapsed());
    let replayed = eventually(Duration::from_secs(15), async || {
        let reply = served.send(payment("ro-1", "{}")).await;
        match reply.status {
            StatusCode::CONFLICT => false,
            _ => {
                reply.assert_replay_of(&pending);
                true
            }
        }
    })
    .await;
    assert!(replayed, "the in-flight run's completion landed");
    served
        .send(payment("ro-0", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 3, "ro-0, ro-1, ro-2 once each");
}

/// A TCP endpoint that follows the primary, as a DNS name (a cloud provider's primary
/// endpoint), HAProxy with a role check or Envoy do: each new connection goes to the node its
/// target names at that moment; connections made before stay where they are.
struct Endpoint {
    port: u16,
    target: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let to = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let port = to.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, target, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn point_at(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The store's URL is an endpoint that follows the primary (a DNS name such as a cloud
/// provider's primary endpoint, HAProxy with a role check). After a failover that demotes the
/// old primary without closing its connections (`REPLICAOF`, `FAILOVER`, a cloud "test
/// failover"), the store's connection is on the demoted node, which answers `READONLY`; the
/// store makes a new connection (at most once a second), which reaches the new primary. A
/// handler in flight at the failover renews its lease and completes there, so no other server
/// of the fleet takes its key over and runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_behind_a_primary_endpoint_moves_the_store_to_the_new_primary() {
    let Some(bin) = bin("endpoint_failover") else {
        return;
    };
    let (a, b) = primary_and_replica(&bin).await;
    let b_port = b.port.to_string();
    let endpoint = Endpoint::start(a.port).await;
    let one = RedisStore::connect(&endpoint.url()).await.unwrap();
    let runs = Runs::default();
    let lease = Duration::from_secs(4);
    let served = Arc::new(
        serve(server(
            one.clone(),
            &runs,
            Duration::from_secs(6),
            move |l| l.lease(lease),
        ))
        .await,
    );
    let fast = serve(server(one.clone(), &runs, Duration::ZERO, |l| l)).await;
    assert_eq!(
        fast.send(payment("ep-0", "{}")).await.status,
        StatusCode::CREATED
    );
    // A long handler holds its key on server one.
    let s1 = served.clone();
    let long = tokio::spawn(async move { s1.send(payment("ep-long", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    caught_up(&a.url(), &b.url()).await;
    // Failover: B promoted, A demoted, the endpoint follows the primary.
    cmd(&b.url(), &["REPLICAOF", "NO", "ONE"]).await;
    cmd(&a.url(), &["REPLICAOF", "127.0.0.1", &b_port]).await;
    endpoint.point_at(b.port);
    linked(&a.url()).await;
    // The endpoint is healthy: a new connection to it writes.
    assert!(
        cmd(&endpoint.url(), &["SET", "probe", "1"])
            .await
            .eq_ignore_ascii_case("ok"),
        "a new connection to the URL reaches the primary"
    );
    // Server two of the fleet, started (or reconnected) after the failover.
    let two = RedisStore::connect(&endpoint.url()).await.unwrap();
    let other = serve(server(two.clone(), &runs, Duration::ZERO, |l| l)).await;
    assert_eq!(
        other.send(payment("ep-1", "{}")).await.status,
        StatusCode::CREATED
    );
    // Server one, 5 s after the failover.
    let t = Instant::now();
    let one_back = eventually(Duration::from_secs(5), async || {
        fast.send(payment("ep-2", "{}")).await.status == StatusCode::CREATED
    })
    .await;
    eprintln!(
        "server one back: {one_back} after {:?}; its error: {:?}",
        t.elapsed(),
        begin_error(&one).await
    );
    // The long handler's key, retried on server two after its lease.
    let retry = other.send(payment("ep-long", "{}")).await;
    eprintln!("retry of the in-flight key on server two: {}", retry.status);
    let long = long.await.unwrap();
    eprintln!("long handler answered {}", long.status);
    let runs_of_long = runs.get() - 2 - usize::from(one_back);
    eprintln!("runs of ep-long: {runs_of_long}");
    assert!(one_back, "server one follows the URL to the new primary");
    assert_eq!(runs_of_long, 1, "ep-long ran once");
}

// ---------------------------------------------------------------------------------------------
// LOADING: a restart that loads a large dataset
// ---------------------------------------------------------------------------------------------

/// Redis restarted with a dataset that takes seconds to load (`key-load-delay` stands in for a
/// large RDB): while it loads, requests get `503` with `Retry-After` (the error says
/// `LOADING`), nothing runs, and `connect` fails as unavailable with the same reason; once
/// loaded, the records saved before the restart replay and new keys run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loading_after_a_restart_answers_503_then_replays() {
    let Some(bin) = bin("loading") else { return };
    let mut node = Node::start(
        &bin,
        &[
            "--key-load-delay",
            "100",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
    );
    let store = RedisStore::connect(&node.url()).await.unwrap();
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    let first = served.send(payment("load-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // 40,000 keys at 100 µs each: about 4 s of loading.
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for chunk in 0..40 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET")
                .arg(format!("filler:{chunk}:{i}"))
                .arg("x")
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    cmd(&node.url(), &["SAVE"]).await;
    node.kill();
    node.restart();
    let t = Instant::now();
    let during = served.send(payment("load-2", "{}")).await;
    eprintln!("during loading ({:?}): {}", t.elapsed(), during.status);
    during.assert_store_unavailable();
    let err = begin_error(&store).await;
    eprintln!("store error while loading: {err:?}");
    assert!(
        err.as_deref()
            .is_some_and(|e| e.to_lowercase().contains("loading")),
        "{err:?}"
    );
    let connecting = RedisStore::connect(&node.url()).await.err();
    eprintln!("connect while loading: {connecting:?}");
    assert!(connecting.is_some_and(|e| e.to_string().to_lowercase().contains("loading")));
    assert_eq!(runs.get(), 1);
    let back = eventually(Duration::from_secs(30), async || {
        let reply = served.send(payment("load-2", "{}")).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            reply.assert_store_unavailable();
            return false;
        }
        assert_eq!(reply.status, StatusCode::CREATED);
        true
    })
    .await;
    eprintln!("loaded after {:?}", t.elapsed());
    assert!(back);
    served
        .send(payment("load-1", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Key prefixes
// ---------------------------------------------------------------------------------------------

/// Two stores on one Redis whose prefixes overlap (`app` and `app:x`, and the empty prefix):
/// the same tenant and key are three records, each store sees and forgets only its own (the
/// prefix ends at the record's `{`, which no prefix may hold). A 64 KiB prefix works. A prefix
/// with a hash tag is refused with a clear panic, on one node and on a cluster alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_empty_and_long_prefixes_never_collide() {
    let Some(bin) = bin("prefixes") else { return };
    let node = Node::start(&bin, &[]);
    let app = RedisStore::builder()
        .prefix("app")
        .connect(&node.url())
        .await
        .unwrap();
    let app_x = RedisStore::builder().prefix("app:x").share(&app);
    let empty = RedisStore::builder().prefix("").share(&app);
    let long = RedisStore::builder()
        .prefix("L".repeat(64 * 1024))
        .share(&app);
    let runs = Runs::default();
    let mut served = Vec::new();
    for store in [&app, &app_x, &empty, &long] {
        served.push(serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await);
    }
    let mut firsts = Vec::new();
    for s in &served {
        let reply = s.send(payment("same-key", "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        firsts.push(reply);
    }
    assert_eq!(runs.get(), 4, "one record per prefix");
    for (s, first) in served.iter().zip(&firsts) {
        s.send(payment("same-key", "{}"))
            .await
            .assert_replay_of(first);
    }
    // Forget through one store: the others keep theirs.
    let op = tower_idempotency::Operator::new(app.clone());
    let record = op.record_key(client_tenant(), "same-key").unwrap();
    assert!(matches!(
        app.forget(&record, false).await.unwrap(),
        tower_idempotency::Forget::Forgotten
    ));
    for (s, first) in served.iter().zip(&firsts).skip(1) {
        s.send(payment("same-key", "{}"))
            .await
            .assert_replay_of(first);
    }
    assert_eq!(cmd(&node.url(), &["DBSIZE"]).await, "3");
    for bad in ["{app}:", "app:{", "}"] {
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = RedisStore::builder().prefix(bad).share(&app);
        }));
        assert!(made.is_err(), "{bad:?} refused");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: ACL users and prefixes
// ---------------------------------------------------------------------------------------------

/// On a Redis Cluster, a user needs [`MINIMAL`] and `CLUSTER SLOTS`, which the cluster client asks for the slot map (its `PING`
/// on each new connection may be refused). With those, limited to `~idempotency:*`, it runs the
/// conformance suite and the API; an empty prefix spreads records over every primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_acl_user_and_empty_prefix() {
    let Some(cluster) = support::cluster::Cluster::start("cluster_acl", 3, 0).await else {
        return;
    };
    let users_urls = |name: &str| -> Vec<String> {
        cluster
            .urls()
            .iter()
            .map(|u| u.replace("redis://", &format!("redis://{name}:pw@")))
            .collect()
    };
    // No `+ping`: the client's `PING` on a new connection may be refused.
    let mut full: Vec<&str> = MINIMAL.to_vec();
    full.push("+cluster|slots");
    let set_everywhere = async |pattern: &str, commands: &[&str]| {
        for url in cluster.urls() {
            set_user(&url, "idem", "pw", &rules(pattern, commands)).await;
        }
    };
    // CLUSTER SLOTS and SCRIPT LOAD taken away in turn.
    for skip in ["+cluster|slots", "+script|load"] {
        let commands: Vec<&str> = full.iter().copied().filter(|c| *c != skip).collect();
        set_everywhere("~idempotency:*", &commands).await;
        let outcome = match tokio::time::timeout(
            Duration::from_secs(10),
            RedisStore::connect_cluster(users_urls("idem")),
        )
        .await
        {
            Err(_) => "connect_cluster hung".to_owned(),
            Ok(Err(err)) => format!("connect_cluster: {err}"),
            Ok(Ok(store)) => match lifecycle(&store).await {
                Ok(()) => "everything works".to_owned(),
                Err(err) => err,
            },
        };
        eprintln!("cluster without {skip}: {outcome}");
        match skip {
            "+cluster|slots" => assert_ne!(outcome, "everything works", "{skip} is needed"),
            _ => assert_eq!(outcome, "everything works", "{skip} is not needed"),
        }
    }
    set_everywhere("~*", &full).await;
    let empty = RedisStore::builder()
        .prefix("")
        .connect_cluster(users_urls("idem"))
        .await
        .unwrap();
    set_everywhere("~idempotency:*", &full).await;
    let store = RedisStore::connect_cluster(users_urls("idem"))
        .await
        .unwrap();
    tower_idempotency::conformance::run_all(store.clone()).await;
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    let first = served.send(payment("c-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    served
        .send(payment("c-1", "{}"))
        .await
        .assert_replay_of(&first);
    // The empty prefix, its user allowed every key (an ACL cannot name "the store's keys" then).
    set_everywhere("~*", &full).await;
    let served_empty = serve(server(empty.clone(), &runs, Duration::ZERO, |l| l)).await;
    for i in 0..30 {
        assert_eq!(
            served_empty
                .send(payment(&format!("e-{i}"), "{}"))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    let mut holding = 0;
    for url in cluster.urls() {
        let keys = support::cluster::keys_on(&url, "{*").await;
        eprintln!("{url}: {} records of the empty prefix", keys.len());
        holding += usize::from(!keys.is_empty());
    }
    assert_eq!(holding, 3, "records on every primary");
    assert_eq!(runs.get(), 31);
}

/// The replica wait needs `WAIT`: a user without it gets `503` for every new key (the error
/// says `NOPERM ... 'wait'`), nothing runs and the in-flight record `begin` wrote is released;
/// `+wait` granted, the same key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_wait_without_the_wait_command() {
    let Some(bin) = bin("acl_wait") else { return };
    let (primary, _replica) = primary_and_replica(&bin).await;
    let admin = primary.url();
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", MINIMAL)).await;
    // Long enough for the replica to answer on a loaded machine: without `+wait` the call is
    // refused at once; with it, the wait ends as soon as the replica has the write.
    let store = RedisStore::builder()
        .replica_wait(1, Duration::from_secs(2))
        .connect(&format!("redis://idem:pw@127.0.0.1:{}", primary.port))
        .await
        .unwrap();
    let runs = Runs::default();
    let served = serve(server(store.clone(), &runs, Duration::ZERO, |l| l)).await;
    served
        .send(payment("wait-1", "{}"))
        .await
        .assert_store_unavailable();
    let err = begin_error(&store).await.expect("WAIT refused");
    eprintln!("without +wait: {err}");
    assert!(err.contains("'wait'"), "{err}");
    assert_eq!(runs.get(), 0);
    assert!(
        eventually(Duration::from_secs(3), async || {
            cmd(&admin, &["DBSIZE"]).await == "0"
        })
        .await,
        "the records begin wrote are released"
    );
    let mut with_wait: Vec<&str> = MINIMAL.to_vec();
    with_wait.push("+wait");
    set_user(&admin, "idem", "pw", &rules("~idempotency:*", &with_wait)).await;
    let first = served.send(payment("wait-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    served
        .send(payment("wait-1", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 1);
}
