//! What a request's fingerprint covers: canonical JSON, JSON Pointers left out of it, and an
//! application's own `Fingerprinter`, through a real axum `Router` and a real server.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http::request::Parts;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use support::raw::{self, RawReply};
use support::{Reply, Runs, Server, api, send};

/// A keyed POST in a tenant's scope, with `content_type`.
fn keyed(uri: &str, key: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, "Bearer sk_test_fingerprint")
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

fn json(key: &str, body: &str) -> Request<Body> {
    keyed("/payments", key, "application/json", body.to_owned())
}

/// Asserts that `retry` replays `original`: same status, same body bytes, marked
/// `Idempotent-Replayed: true`.
fn assert_replays(retry: &Reply, original: &Reply) {
    assert_eq!(retry.status, original.status, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, original.body);
}

fn app(runs: &Runs, layer: IdempotencyLayer<MemoryStore>) -> Router {
    api(runs.clone()).layer(layer)
}

fn ignoring(pointers: &[&str]) -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::new()).ignore_json_pointers(pointers.iter().copied())
}

/// Sends `first`, then each of `same` (replayed: the handler does not run again) and each of
/// `other` (another request: `422`), all with one key.
async fn check(app: &Router, runs: &Runs, first: &str, same: &[&str], other: &[&str]) {
    let key = support::unique_key("fp");
    let original = send(app, json(&key, first)).await;
    assert_eq!(original.status, StatusCode::CREATED, "{original:?}");
    let ran = runs.get();
    for body in same {
        let retry = send(app, json(&key, body)).await;
        assert_replays(&retry, &original);
        assert_eq!(runs.get(), ran, "{body} replays");
    }
    for body in other {
        let reply = send(app, json(&key, body)).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(reply.code(), "idempotency_key_reuse");
        assert_eq!(runs.get(), ran, "{body} does not run");
    }
}

#[tokio::test]
async fn a_retry_with_a_new_timestamp_replays() {
    let runs = Runs::default();
    let app = app(&runs, ignoring(&["/timestamp"]));
    let key = "retry-with-new-timestamp";
    let first = send(
        &app,
        json(key, r#"{"amount":100,"timestamp":"2026-12-06T10:00:00Z"}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The handler got the body as sent (it echoes it): the layer read it once, and passed it on.
    assert_eq!(
        first.json()["request"],
        r#"{"amount":100,"timestamp":"2026-12-06T10:00:00Z"}"#
    );
    let retry = send(
        &app,
        json(
            key,
            r#"{ "timestamp": "2026-12-06T10:00:05Z", "amount": 100 }"#,
        ),
    )
    .await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_replays(&retry, &first);
    assert_eq!(runs.get(), 1);

    let other = send(
        &app,
        json(key, r#"{"amount":200,"timestamp":"2026-12-06T10:00:09Z"}"#),
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn nested_pointers() {
    let runs = Runs::default();
    let app = app(
        &runs,
        ignoring(&["/metadata/trace_id", "/metadata/sent_at"]),
    );
    check(
        &app,
        &runs,
        r#"{"amount":1,"metadata":{"trace_id":"a1","sent_at":1,"note":"rent"}}"#,
        &[
            r#"{"amount":1,"metadata":{"trace_id":"b2","sent_at":2,"note":"rent"}}"#,
            r#"{"metadata":{"note":"rent","sent_at":{"s":3},"trace_id":null},"amount":1.0}"#,
        ],
        &[
            r#"{"amount":1,"metadata":{"trace_id":"a1","sent_at":1,"note":"food"}}"#,
            // The member left out still has to be there.
            r#"{"amount":1,"metadata":{"sent_at":1,"note":"rent"}}"#,
            r#"{"amount":1,"trace_id":"a1","metadata":{"sent_at":1,"note":"rent"}}"#,
        ],
    )
    .await;
}

#[tokio::test]
async fn array_elements() {
    let runs = Runs::default();
    let app = app(&runs, ignoring(&["/items/0/nonce", "/attempts/1"]));
    check(
        &app,
        &runs,
        r#"{"items":[{"sku":"a","nonce":1},{"sku":"b","nonce":1}],"attempts":[1,2,3]}"#,
        &[r#"{"items":[{"sku":"a","nonce":9},{"sku":"b","nonce":1}],"attempts":[1,"x",3]}"#],
        &[
            // Only element 0's nonce is left out.
            r#"{"items":[{"sku":"a","nonce":1},{"sku":"b","nonce":9}],"attempts":[1,2,3]}"#,
            // Elements keep their places: none is dropped, none added.
            r#"{"items":[{"sku":"a","nonce":1},{"sku":"b","nonce":1}],"attempts":[1,3]}"#,
            r#"{"items":[{"sku":"a","nonce":1}],"attempts":[1,2,3]}"#,
            r#"{"items":[{"sku":"b","nonce":1},{"sku":"a","nonce":1}],"attempts":[1,2,3]}"#,
        ],
    )
    .await;
}

#[tokio::test]
async fn escaped_tokens() {
    let runs = Runs::default();
    // `~1` is `/` and `~0` is `~` in a key.
    let app = app(&runs, ignoring(&["/a~1b", "/m~0n"]));
    check(
        &app,
        &runs,
        r#"{"a/b":1,"m~n":1,"a~1b":1,"amount":5}"#,
        &[r#"{"a/b":2,"m~n":2,"a~1b":1,"amount":5}"#],
        &[r#"{"a/b":1,"m~n":1,"a~1b":2,"amount":5}"#],
    )
    .await;
}

#[tokio::test]
async fn numbers_and_escapes_by_value() {
    let runs = Runs::default();
    let app = app(
        &runs,
        IdempotencyLayer::new(MemoryStore::new()).canonical_json(true),
    );
    check(
        &app,
        &runs,
        r#"{"amount":100,"payee":"Ana"}"#,
        &[
            r#"{"payee":"\u0041na","amount":100.0}"#,
            r#"{"amount":1e2,"payee":"Ana"}"#,
        ],
        &[
            r#"{"amount":100.5,"payee":"Ana"}"#,
            r#"{"amount":"100","payee":"Ana"}"#,
        ],
    )
    .await;
    // Integers past u64 and f64 keep every digit.
    check(
        &app,
        &runs,
        r#"{"amount":100000000000000000001}"#,
        &[r#"{"amount":100000000000000000001.00}"#],
        &[r#"{"amount":100000000000000000002}"#],
    )
    .await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_fingerprinted_as_sent() {
    let runs = Runs::default();
    let app = app(&runs, ignoring(&["/timestamp"]));
    let first_body = r#"{"amount":1,"timestamp":1}"#;
    let other_body = r#"{"amount":1,"timestamp":2}"#;

    // Another content type: JSON text, but not a JSON body.
    let text = |key: &str, body: &str| keyed("/payments", key, "text/plain", body.to_owned());
    let first = send(&app, text("plain", first_body)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_replays(&send(&app, text("plain", first_body)).await, &first);
    let reply = send(&app, text("plain", other_body)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reformatted = send(&app, text("plain", r#"{ "amount":1,"timestamp":1}"#)).await;
    assert_eq!(reformatted.status, StatusCode::UNPROCESSABLE_ENTITY);

    // No content type at all: a body that parses as JSON is JSON.
    let bare = |body: &str| {
        Request::post("/payments")
            .header("idempotency-key", "bare")
            .header(header::AUTHORIZATION, "Bearer sk_test_fingerprint")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let first = send(&app, bare(first_body)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_replays(&send(&app, bare(other_body)).await, &first);
    assert_eq!(runs.get(), 2);

    // A JSON body that does not parse, or names a key twice: as sent, nothing left out.
    check(
        &app,
        &runs,
        r#"{"amount":1,"timestamp":1"#,
        &[r#"{"amount":1,"timestamp":1"#],
        &[
            r#"{"amount":1,"timestamp":2"#,
            r#"{"amount":1, "timestamp":1"#,
        ],
    )
    .await;
    check(
        &app,
        &runs,
        r#"{"amount":1,"amount":2,"timestamp":1}"#,
        &[r#"{"amount":1,"amount":2,"timestamp":1}"#],
        &[
            r#"{"amount":1,"amount":2,"timestamp":2}"#,
            r#"{"amount":2,"amount":1,"timestamp":1}"#,
        ],
    )
    .await;
}

#[tokio::test]
async fn problem_json_and_other_json_types_are_json() {
    let runs = Runs::default();
    let app = app(&runs, ignoring(&["/timestamp"]));
    let first = send(
        &app,
        keyed(
            "/payments",
            "vnd",
            "application/vnd.api+json; charset=utf-8",
            r#"{"amount":1,"timestamp":1}"#,
        ),
    )
    .await;
    let retry = send(
        &app,
        keyed(
            "/payments",
            "vnd",
            "Application/VND.API+JSON",
            r#"{"amount":1,"timestamp":2}"#,
        ),
    )
    .await;
    assert_replays(&retry, &first);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_deep_body_neither_overflows_nor_fails() {
    let runs = Runs::default();
    let app = app(
        &runs,
        IdempotencyLayer::new(MemoryStore::new()).canonical_json(true),
    );
    // 2 MiB of `[`, the default body limit: not JSON (it never closes) and far too deep.
    let deep = vec![b'['; 2 * 1024 * 1024];
    let request = |body: Vec<u8>| keyed("/status/201", "deep", "application/json", body);
    let first = send(&app, request(deep.clone())).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_replays(&send(&app, request(deep.clone())).await, &first);
    let mut other = deep.clone();
    *other.last_mut().unwrap() = b'{';
    assert_eq!(
        send(&app, request(other)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // A valid document nested past the bound is fingerprinted as sent: reformatting it is
    // another request.
    let levels = 100_000;
    let closed = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let request = |body: String| keyed("/status/201", "deep-closed", "application/json", body);
    let first = send(&app, request(closed.clone())).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_replays(&send(&app, request(closed.clone())).await, &first);
    let spaced = format!("{} {}", "[".repeat(levels), "]".repeat(levels));
    assert_eq!(
        send(&app, request(spaced)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(runs.get(), 2);
}

/// The amount and currency of a JSON body; any other body as sent.
fn amount_and_currency(_parts: &Parts, body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => serde_json::to_vec(&[&json["amount"], &json["currency"]]).unwrap(),
        Err(_) => body.to_vec(),
    }
}

#[tokio::test]
async fn a_fingerprinter_of_the_application() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        // Does not apply while a fingerprinter is set.
        .ignore_json_pointers(["/amount"])
        .fingerprint_with(amount_and_currency);
    let app = app(&runs, layer);
    check(
        &app,
        &runs,
        r#"{"amount":5,"currency":"EUR","note":"a"}"#,
        &[r#"{"currency":"EUR","amount":5,"note":"b","attempt":2}"#],
        &[
            r#"{"amount":6,"currency":"EUR","note":"a"}"#,
            r#"{"amount":5,"currency":"USD","note":"a"}"#,
        ],
    )
    .await;

    // The path stays in the fingerprint: the same key and body on another route is `422`.
    let body = r#"{"amount":7,"currency":"EUR"}"#;
    let first = send(&app, json("other-route", body)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let elsewhere = keyed("/status/201", "other-route", "application/json", body);
    let reply = send(&app, elsewhere).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.code(), "idempotency_key_reuse");
    // And the handler still gets the whole body, read once.
    assert_eq!(first.json()["request"], body);
}

#[tokio::test]
async fn a_closure_fingerprinter() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_with(
        |_parts: &Parts, body: &[u8]| {
            body.split(|&b| b == b'\n')
                .next()
                .unwrap_or_default()
                .to_vec()
        },
    );
    let app = app(&runs, layer);
    let text = |body: &str| keyed("/payments", "lines", "text/plain", body.to_owned());
    let first = send(&app, text("pay 10\nlog a")).await;
    assert_replays(&send(&app, text("pay 10\nlog b\nlog c")).await, &first);
    assert_eq!(
        send(&app, text("pay 11\nlog a")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(runs.get(), 1);
}

#[test]
#[should_panic(expected = "\"timestamp\" is not a JSON Pointer (RFC 6901)")]
fn a_pointer_must_start_with_a_slash() {
    let _ = IdempotencyLayer::new(MemoryStore::new()).ignore_json_pointers(["timestamp"]);
}

#[test]
#[should_panic(expected = "\"/a~2\" is not a JSON Pointer (RFC 6901)")]
fn a_tilde_must_be_escaped() {
    let _ = IdempotencyLayer::new(MemoryStore::new())
        .ignore_json_pointers(vec!["/ok".to_owned(), "/a~2".to_owned()]);
}

#[test]
#[should_panic(expected = "the empty pointer is the whole body")]
fn the_whole_body_cannot_be_left_out() {
    let _ = IdempotencyLayer::new(MemoryStore::new()).ignore_json_pointers([""]);
}

#[test]
fn configuring_pointers_does_not_change_a_clone() {
    let base = IdempotencyLayer::new(MemoryStore::new()).canonical_json(true);
    let with = base.clone().ignore_json_pointers(["/timestamp"]);
    assert_ne!(format!("{base:?}"), format!("{with:?}"));
    assert!(format!("{with:?}").contains("ignore_json_pointers: true"));
    assert!(format!("{base:?}").contains("ignore_json_pointers: false"));
}

/// Sends a keyed JSON request on its own connection, its body in chunks of 7 bytes
/// (`Transfer-Encoding: chunked`), and reads the whole answer (within 10 s).
async fn over_tcp(addr: SocketAddr, key: &str, body: &str) -> RawReply {
    let mut request = format!(
        "POST /payments HTTP/1.1\r\nHost: {addr}\r\nIdempotency-Key: {key}\r\n\
         Authorization: Bearer sk_test_tcp\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.as_bytes().chunks(7) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    tokio::time::timeout(Duration::from_secs(10), raw::exchange(addr, request))
        .await
        .unwrap()
}

#[tokio::test]
async fn over_a_real_server() {
    let runs = Runs::default();
    let app = app(&runs, ignoring(&["/sent_at", "/client/trace"]));
    let server = Server::start(app, Default::default()).await;
    let addr = server.addr;

    let first = r#"{"amount": 250, "currency": "EUR", "sent_at": 1, "client": {"trace": "t-1"}}"#;
    let retry = r#"{
        "client": { "trace": "t-2" },
        "sent_at": 2,
        "currency": "\u0045UR",
        "amount": 2.5e2
    }"#;
    let original = over_tcp(addr, "tcp-1", first).await;
    assert_eq!(original.status_line(), "HTTP/1.1 201 Created");
    assert_eq!(original.header("idempotent-replayed"), None);
    let replay = over_tcp(addr, "tcp-1", retry).await;
    assert_eq!(replay.status_line(), "HTTP/1.1 201 Created");
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, original.body);
    assert_eq!(runs.get(), 1);

    let changed = first.replace("250", "251");
    let reused = over_tcp(addr, "tcp-1", &changed).await;
    assert_eq!(reused.status_line(), "HTTP/1.1 422 Unprocessable Entity");
    assert_eq!(runs.get(), 1);
}

/// The `Host` is not part of the fingerprint: the same request sent to another name of the same
/// service (a load balancer's, a region's) replays, as README says.
#[tokio::test]
async fn the_host_is_not_in_the_fingerprint() {
    let runs = Runs::default();
    let app = app(&runs, IdempotencyLayer::new(MemoryStore::new()));
    let with_host = |host: &str| {
        let mut request = json("host-1", r#"{"amount":5}"#);
        request
            .headers_mut()
            .insert(header::HOST, host.parse().unwrap());
        request
    };
    let first = send(&app, with_host("api.example.com")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, with_host("eu.api.example.com")).await;
    assert_replays(&retry, &first);
    assert_eq!(runs.get(), 1);
}

/// The same request as HTTP/2 sends it: the host in the URI's authority (`:authority`), no
/// `Host` field, and names in lower case.
fn over_h2(key: &str, body: &str) -> Request<Body> {
    let mut request = json(key, body);
    *request.uri_mut() = "https://api.example.com/payments".parse().unwrap();
    *request.version_mut() = http::Version::HTTP_2;
    request
}

/// A fingerprinted `Host`: a retry that comes by HTTP/2 (through a proxy that speaks it to this
/// server, HTTP/1.1 to the last), with the host in `:authority`, is the same request; another
/// host is another request.
#[tokio::test]
async fn a_fingerprinted_host_is_the_same_over_http2() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_headers([header::HOST]);
    let app = app(&runs, layer);
    let body = r#"{"amount":5}"#;
    let mut first = json("h2-host", body);
    first
        .headers_mut()
        .insert(header::HOST, "api.example.com".parse().unwrap());
    let first = send(&app, first).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, over_h2("h2-host", body)).await;
    assert_replays(&retry, &first);
    let mut elsewhere = over_h2("h2-host", body);
    *elsewhere.uri_mut() = "https://eu.api.example.com/payments".parse().unwrap();
    let reused = send(&app, elsewhere).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

/// A fingerprinted `Cookie`: HTTP/2 may send it as crumbs, a field each (RFC 9113 §8.2.3); they
/// are the one field HTTP/1.1 sends, and other cookies are another request.
#[tokio::test]
async fn a_fingerprinted_cookie_is_the_same_in_crumbs() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_headers([header::COOKIE]);
    let app = app(&runs, layer);
    let body = r#"{"amount":5}"#;
    let with_cookies = |request: Request<Body>, crumbs: &[&str]| {
        let mut request = request;
        for crumb in crumbs {
            let value = crumb.parse().unwrap();
            request.headers_mut().append(header::COOKIE, value);
        }
        request
    };
    let first = send(&app, with_cookies(json("crumbs", body), &["a=1; b=2"])).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, with_cookies(over_h2("crumbs", body), &["a=1", "b=2"])).await;
    assert_replays(&retry, &first);
    for other in [&["a=1", "b=3"][..], &["a=1"], &["b=2", "a=1"]] {
        let reused = send(&app, with_cookies(over_h2("crumbs", body), other)).await;
        assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    }
    assert_eq!(runs.get(), 1);
}
