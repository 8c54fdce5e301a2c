//! The request flow of DESIGN.md, row by row, through a real axum `Router`.

#[macro_use]
mod support;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use support::{Runs, Transport, Via, api, post_with_key, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome};

fn app(runs: &Runs) -> Router {
    api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
}

/// A keyed request in a tenant's scope (a static API key, with the default tenant).
fn tenant_post(uri: &str, key: &str, body: &'static str) -> Request<Body> {
    let mut request = post_with_key(uri, key, body);
    let token = header::HeaderValue::from_static("Bearer sk_test_1");
    request.headers_mut().insert(header::AUTHORIZATION, token);
    request
}

#[tokio::test]
async fn first_request_runs_and_retry_replays_byte_for_byte() {
    let runs = Runs::default();
    let app = app(&runs);
    let first = send(&app, tenant_post("/payments", "key-1", r#"{"amount":100}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotency-key"), Some("key-1"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(first.outcome, Some(Outcome::Executed));

    let retry = send(&app, tenant_post("/payments", "key-1", r#"{"amount":100}"#)).await;
    assert_eq!(runs.get(), 1, "the handler ran once");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.outcome, Some(Outcome::Replayed));
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("idempotency-key"), Some("key-1"));
    for name in ["location", "x-custom", "content-type"] {
        assert_eq!(retry.headers.get(name), first.headers.get(name), "{name}");
    }
    let cookies = |r: &support::Reply| -> Vec<_> {
        r.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect()
    };
    assert_eq!(cookies(&retry), cookies(&first));
    assert_eq!(cookies(&retry).len(), 2);
    assert_eq!(
        retry.headers.get(header::DATE),
        None,
        "Date is not replayed"
    );

    let third = send(&app, tenant_post("/payments", "key-1", r#"{"amount":100}"#)).await;
    assert!(third.replayed());
    assert_eq!(third.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn uncovered_methods_and_requests_without_key_pass_through() {
    let runs = Runs::default();
    let app = app(&runs);
    for _ in 0..2 {
        let get = Request::get("/payments")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap();
        let reply = send(&app, get).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("idempotency-key"), None);
        assert_eq!(reply.outcome, None);
    }
    for _ in 0..2 {
        let post = Request::post("/payments").body(Body::from("{}")).unwrap();
        let reply = send(&app, post).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(reply.outcome, None);
    }
    // A PUT with a key is not covered by default: it runs every time.
    for _ in 0..2 {
        let put = Request::put("/payments")
            .header("idempotency-key", "k")
            .body(Body::from("{}"))
            .unwrap();
        assert!(!send(&app, put).await.replayed());
    }
    assert_eq!(runs.get(), 6);
}

#[tokio::test]
async fn patch_is_covered_by_default_and_methods_are_configurable() {
    let runs = Runs::default();
    let app = app(&runs);
    let patch = || {
        Request::patch("/payments")
            .header("idempotency-key", "p")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, patch()).await;
    assert!(send(&app, patch()).await.replayed());
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .methods([Method::PUT]),
    );
    let put = || {
        Request::put("/payments")
            .header("idempotency-key", "p")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, put()).await;
    assert!(send(&app, put()).await.replayed());
    // POST is no longer covered.
    send(&app, post_with_key("/payments", "p2", "{}")).await;
    assert!(
        !send(&app, post_with_key("/payments", "p2", "{}"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn missing_key_is_400_when_required() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .require_key(true),
    );
    let reply = send(
        &app,
        Request::post("/payments").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.code(), "idempotency_key_missing");
    assert_eq!(reply.outcome, Some(Outcome::MissingKey));
    assert_eq!(runs.get(), 0);
    // GET is not covered, so it needs no key.
    let reply = send(&app, Request::get("/payments").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_keys_are_400() {
    let runs = Runs::default();
    let app = app(&runs);
    let long = "k".repeat(256);
    let quoted_long = format!("\"{}\"", "k".repeat(256));
    let cases: Vec<Vec<&[u8]>> = vec![
        vec![b""],
        vec![b"\"\""],
        vec![long.as_bytes()],
        vec![quoted_long.as_bytes()],
        vec![b"has space"],
        vec![b"tab\there"],
        vec!["cl\u{e9}".as_bytes()],
        vec![b"\"unterminated"],
        vec![b"\"a\"trailing"],
        vec![b"a, b"],
        vec![b"\"a\", \"b\""],
        vec![b"a", b"a"],
        vec![b"a", b"b"],
    ];
    for values in cases {
        let mut request = Request::post("/payments").body(Body::from("{}")).unwrap();
        for value in &values {
            request.headers_mut().append(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let reply = send(&app, request).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{values:?}");
        assert_eq!(reply.code(), "idempotency_key_invalid", "{values:?}");
        assert_eq!(reply.outcome, Some(Outcome::InvalidKey));
    }
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn keys_at_the_limits_are_accepted() {
    let runs = Runs::default();
    let app = app(&runs);
    let longest = "k".repeat(255);
    let visible: String = ('!'..='~').filter(|c| *c != ',' && *c != '"').collect();
    for key in [longest.as_str(), "k", visible.as_str()] {
        let request = || {
            Request::post("/payments")
                .header("idempotency-key", key)
                .body(Body::from("{}"))
                .unwrap()
        };
        let first = send(&app, request()).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}");
        assert_eq!(first.header("idempotency-key"), Some(key));
        assert!(send(&app, request()).await.replayed());
    }
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn quoted_and_bare_forms_are_the_same_key_and_echo_as_sent() {
    let runs = Runs::default();
    let app = app(&runs);
    let first = send(&app, post_with_key("/payments", "\"abc\"", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotency-key"), Some("\"abc\""));
    let retry = send(&app, post_with_key("/payments", "abc", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.header("idempotency-key"), Some("abc"));
    assert_eq!(runs.get(), 1);
    // A Structured-Field Item may carry parameters, which are ignored: the same key.
    let with_parameters = send(&app, post_with_key("/payments", "\"abc\";x=1;y", "{}")).await;
    assert!(with_parameters.replayed());
    assert_eq!(
        with_parameters.header("idempotency-key"),
        Some("\"abc\";x=1;y")
    );
    assert_eq!(with_parameters.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn stored_statuses_replay_and_failures_release() {
    for (code, stored) in [
        (200, true),
        (202, true),
        (303, true),
        (402, true),
        (404, true),
        (409, true),
        (410, true),
        (400, false),
        (401, false),
        (403, false),
        (405, false),
        (407, false),
        (412, false),
        (413, false),
        (415, false),
        (422, false),
        (408, false),
        (429, false),
        (500, false),
        (502, false),
        (503, false),
    ] {
        let runs = Runs::default();
        let app = app(&runs);
        let uri = format!("/status/{code}");
        let request = || {
            Request::post(uri.as_str())
                .header("idempotency-key", "k")
                .body(Body::empty())
                .unwrap()
        };
        let first = send(&app, request()).await;
        assert_eq!(first.status.as_u16(), code);
        assert_eq!(first.header("idempotency-key"), Some("k"));
        let expected = if stored {
            Outcome::Executed
        } else {
            Outcome::Released
        };
        assert_eq!(first.outcome, Some(expected), "{code}");
        let retry = send(&app, request()).await;
        assert_eq!(retry.status.as_u16(), code);
        assert_eq!(retry.replayed(), stored, "{code}");
        assert_eq!(runs.get(), if stored { 1 } else { 2 }, "{code}");
        if stored {
            assert_eq!(retry.body, first.body);
        } else {
            assert_eq!(&retry.body[..], format!("status {code} run 2").as_bytes());
        }
    }
}

#[tokio::test]
async fn cache_policy_is_configurable() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .cache_policy(|s| s.is_success() || s == 503),
    );
    for code in [404, 503] {
        let uri = format!("/status/{code}");
        let request = || {
            Request::post(uri.as_str())
                .header("idempotency-key", format!("k{code}"))
                .body(Body::empty())
                .unwrap()
        };
        send(&app, request()).await;
        assert_eq!(send(&app, request()).await.replayed(), code == 503);
    }
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn reusing_a_key_for_another_request_is_422() {
    let runs = Runs::default();
    let app = app(&runs);
    send(
        &app,
        post_with_key("/payments?currency=eur", "k", r#"{"amount":1}"#),
    )
    .await;
    let others = [
        post_with_key("/payments?currency=eur", "k", r#"{"amount":2}"#),
        post_with_key("/payments?currency=usd", "k", r#"{"amount":1}"#),
        post_with_key("/payments", "k", r#"{"amount":1}"#),
        post_with_key("/status/200?currency=eur", "k", r#"{"amount":1}"#),
        Request::patch("/payments?currency=eur")
            .header("idempotency-key", "k")
            .body(Body::from(r#"{"amount":1}"#))
            .unwrap(),
    ];
    for request in others {
        let reply = send(&app, request).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.code(), "idempotency_key_reuse");
        assert_eq!(reply.header("idempotency-key"), Some("k"));
        assert_eq!(reply.outcome, Some(Outcome::Mismatch));
    }
    // The original request still replays.
    let retry = send(
        &app,
        post_with_key("/payments?currency=eur", "k", r#"{"amount":1}"#),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn json_bodies_differing_in_order_are_different_requests_by_default() {
    let runs = Runs::default();
    let app = app(&runs);
    send(&app, post_with_key("/payments", "k", r#"{"a":1,"b":2}"#)).await;
    let reply = send(
        &app,
        post_with_key("/payments", "k", r#"{ "b": 2, "a": 1 }"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn canonical_json_makes_key_order_and_whitespace_irrelevant() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .canonical_json(true),
    );
    let first = send(&app, post_with_key("/payments", "k", r#"{"a":1,"b":2}"#)).await;
    let retry = send(
        &app,
        post_with_key("/payments", "k", r#"{ "b": 2, "a": 1 }"#),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    let other = send(&app, post_with_key("/payments", "k", r#"{"a":1,"b":3}"#)).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn selected_headers_join_the_fingerprint() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .fingerprint_headers([header::CONTENT_TYPE]),
    );
    send(&app, post_with_key("/payments", "k", "{}")).await;
    let text = Request::post("/payments")
        .header("idempotency-key", "k")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(
        send(&app, text).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert!(
        send(&app, post_with_key("/payments", "k", "{}"))
            .await
            .replayed()
    );
}

#[tokio::test]
async fn skipped_response_headers_are_not_replayed() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .skip_response_headers([header::SET_COOKIE]),
    );
    let first = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(first.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    let retry = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.headers.get_all(header::SET_COOKIE).iter().count(), 0);
    assert_eq!(retry.header("location"), Some("/payments/1"));
}

#[tokio::test]
async fn binary_bodies_replay_exactly() {
    let runs = Runs::default();
    let app = app(&runs);
    let first = send(&app, post_with_key("/binary", "k", "")).await;
    assert_eq!(first.body.len(), 256);
    let retry = send(&app, post_with_key("/binary", "k", "")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
}

#[tokio::test]
async fn custom_key_header_name() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .header_name(axum::http::HeaderName::from_static("x-request-key")),
    );
    let request = || {
        Request::post("/payments")
            .header("x-request-key", "k")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = send(&app, request()).await;
    assert_eq!(first.header("x-request-key"), Some("k"));
    assert!(send(&app, request()).await.replayed());
    // The standard header is not looked at any more.
    send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn the_handler_sees_the_key_and_its_tenant() {
    use axum::Extension;
    use axum::routing::post;
    use tower_idempotency::{IdempotencyKey, TenantId};

    let app = axum::Router::new()
        .route(
            "/payments",
            post(|Extension(key): Extension<IdempotencyKey>| async move {
                let shared = *key.tenant() == TenantId::shared();
                format!("{} {shared}", key.as_str())
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let reply = send(&app, post_with_key("/payments", "\"quoted-key\"", "{}")).await;
    assert_eq!(reply.body, "quoted-key true");
}

/// Trailers that follow a handler's body (gRPC's `grpc-status`, a checksum) reach the first
/// client and every replay, through `oneshot` and through a real server (whose client asks for
/// them with `TE: trailers`, as HTTP/1.1 wants).
#[tokio::test]
async fn trailers_reach_the_first_client_and_every_replay() {
    use axum::response::IntoResponse;
    use bytes::Bytes;
    use http_body::Frame;

    for transport in [Transport::Oneshot, Transport::Loopback] {
        let runs = Runs::default();
        let handler = {
            let runs = runs.clone();
            move || async move {
                let n = runs.bump();
                let mut trailers = header::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                trailers.insert("x-run", n.to_string().parse().unwrap());
                let frames = [
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("run {n}")))),
                    Ok(Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                // HTTP/1.1 sends the trailer fields the response announces.
                let announced = [(header::TRAILER, "grpc-status, x-run")];
                (StatusCode::OK, announced, Body::new(body)).into_response()
            }
        };
        let app = Router::new()
            .route("/stream", axum::routing::post(handler))
            .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
        let via = Via::new(app, transport).await;
        let request = || {
            let mut request = post_with_key("/stream", "k", "{}");
            let te = header::HeaderValue::from_static("trailers");
            request.headers_mut().insert(header::TE, te);
            request
        };
        let first = via.send(request()).await;
        assert_eq!(first.status, StatusCode::OK, "{transport:?}");
        assert_eq!(first.body, "run 1");
        let trailers = first.trailers.clone();
        let trailers = trailers.unwrap_or_else(|| panic!("{transport:?}: no trailers"));
        assert_eq!(trailers["grpc-status"], "0", "{transport:?}");
        assert_eq!(trailers["x-run"], "1");
        let replay = via.send(request()).await;
        assert!(replay.replayed(), "{transport:?}");
        assert_eq!(replay.body, "run 1");
        assert_eq!(replay.header("trailer"), Some("grpc-status, x-run"));
        assert_eq!(replay.trailers, Some(trailers), "{transport:?}");
        assert_eq!(runs.get(), 1);
    }
}

/// Only the layer marks a replay: a handler that passes on `Idempotent-Replayed: true` (an
/// upstream idempotent API's answer, forwarded) does not tell a first run's client that nothing
/// ran, whatever its status; its retry is marked by the layer.
#[tokio::test]
async fn a_first_run_never_says_replayed_whatever_its_handler_sets() {
    use axum::routing::post;
    let runs = Runs::default();
    let forwarding = {
        let runs = runs.clone();
        move |body: String| {
            let runs = runs.clone();
            async move {
                runs.bump();
                let status = if body == "fail" {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::CREATED
                };
                (status, [("idempotent-replayed", "true")], "upstream answer")
            }
        }
    };
    let app = Router::new()
        .route("/forward", post(forwarding))
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    for (key, body) in [("forward-1", "ok"), ("forward-2", "fail")] {
        let first = send(&app, post_with_key("/forward", key, body)).await;
        assert_eq!(first.header("idempotent-replayed"), None, "{key}");
        assert_ne!(first.outcome, Some(Outcome::Replayed), "{key}");
    }
    let retry = send(&app, post_with_key("/forward", "forward-1", "ok")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, &b"upstream answer"[..]);
    assert_eq!(runs.get(), 2);
}

/// A keyed request's trailers reach its handler, over a real connection (a chunked body and
/// its trailer field), as they do without a key; they are not part of the fingerprint.
#[tokio::test]
async fn a_keyed_requests_trailers_reach_its_handler() {
    use support::raw;
    async fn echo_trailer(request: Request<Body>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let collected = request.into_body().collect().await.unwrap();
        let trailer = collected.trailers().and_then(|t| t.get("x-sum")).cloned();
        let trailer = trailer.map_or("none".into(), |t| t.to_str().unwrap().to_owned());
        let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        (StatusCode::CREATED, format!("{body} trailer={trailer}"))
    }
    let app = Router::new()
        .route("/upload", axum::routing::post(echo_trailer))
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let server = support::Server::start(app, Default::default()).await;
    let chunked = |key: Option<&str>| {
        let key = key.map_or(String::new(), |k| format!("Idempotency-Key: {k}\r\n"));
        format!(
            "POST /upload HTTP/1.1\r\nHost: test\r\n{key}Transfer-Encoding: chunked\r\n\
             Trailer: x-sum\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 900150\r\n\r\n"
        )
    };
    let unkeyed = raw::exchange(server.addr, chunked(None)).await;
    assert_eq!(unkeyed.text(), "abc trailer=900150");
    let keyed = raw::exchange(server.addr, chunked(Some("trailer-1"))).await;
    assert_eq!(keyed.status, 201, "{keyed:?}");
    assert_eq!(keyed.text(), "abc trailer=900150");
    let retry = raw::exchange(server.addr, chunked(Some("trailer-1"))).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "abc trailer=900150");
}

/// A handler that passes on an upstream's response with its `Transfer-Encoding: chunked` (a
/// gateway): the layer reads the body whole and sends it with its length, so that header goes;
/// the first client gets the answer, and the retry its replay.
#[tokio::test]
async fn a_handler_s_own_transfer_encoding_does_not_cost_the_first_answer() {
    use support::raw;
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                runs.bump();
                let chunks = ["one,", "two,", "three"].map(Ok::<_, std::io::Error>);
                axum::http::Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::TRANSFER_ENCODING, "chunked")
                    .body(Body::from_stream(futures_util::stream::iter(chunks)))
                    .unwrap()
            }
        }
    };
    let app = Router::new()
        .route("/gateway", axum::routing::post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let server = support::Server::start(app, Default::default()).await;
    let request = raw::post("/gateway", &[("Idempotency-Key", "gateway-1")], "{}");
    let first = raw::exchange(server.addr, &request).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.text(), "one,two,three");
    let retry = raw::exchange(server.addr, &request).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "one,two,three");
    assert_eq!(runs.get(), 1);
}

/// A request's own extensions (an auth middleware's user, axum's path parameters) stay with it:
/// an answer the handler did not give carries its outcome and none of them, whether the request
/// came with extensions or without.
#[tokio::test]
async fn an_answer_without_the_handler_carries_its_outcome_and_none_of_the_requests_extensions() {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt, service_fn};
    use tower_idempotency::RequestBody;

    #[derive(Clone, Debug, PartialEq)]
    struct User(&'static str);

    let runs = Runs::default();
    let counted = runs.clone();
    let handler = service_fn(move |_: Request<RequestBody<Body>>| {
        counted.bump();
        async { Ok::<_, Infallible>(axum::http::Response::new(Body::from("made"))) }
    });
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .layer(handler);
    let request = |key: &str, body: &'static str, user: Option<&'static str>| {
        let mut request = post_with_key("/payments", key, body);
        if let Some(user) = user {
            request.extensions_mut().insert(User(user));
        }
        request
    };
    for user in [Some("ada"), None] {
        let key = format!("extensions-{user:?}");
        let first = svc
            .clone()
            .oneshot(request(&key, "{}", user))
            .await
            .unwrap();
        assert_eq!(
            first.extensions().get::<Outcome>(),
            Some(&Outcome::Executed)
        );
        assert_eq!(first.extensions().get::<User>(), None);
        first.into_body().collect().await.unwrap();
        let cases = [
            ("{}", StatusCode::OK, Outcome::Replayed),
            (
                r#"{"other":1}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Outcome::Mismatch,
            ),
        ];
        for (body, status, outcome) in cases {
            let answer = svc
                .clone()
                .oneshot(request(&key, body, user))
                .await
                .unwrap();
            assert_eq!(answer.status(), status, "{user:?}");
            assert_eq!(
                answer.extensions().get::<Outcome>(),
                Some(&outcome),
                "{user:?}"
            );
            assert_eq!(answer.extensions().get::<User>(), None, "{user:?}");
            assert_eq!(answer.extensions().len(), 1, "{user:?}");
        }
        // Refused before the store is asked: a key that is not valid.
        let refused = svc
            .clone()
            .oneshot(request("two words", "{}", user))
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            refused.extensions().get::<Outcome>(),
            Some(&Outcome::InvalidKey)
        );
        assert_eq!(refused.extensions().len(), 1, "{user:?}");
    }
    assert_eq!(runs.get(), 2, "the handler ran once per key");
}
