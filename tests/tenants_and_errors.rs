//! Tenant scoping and error rendering.

#[macro_use]
mod support;

use axum::body::Body;
use axum::http::{HeaderName, Request, Response, StatusCode, header};
use bytes::Bytes;
use support::auth::{Auth, Unknown};
use support::{Runs, api, send};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore, Outcome, Problem, TenantFromExtension, TenantFromHeader,
    TenantId, TenantRejection,
};

fn keyed(auth: Option<&str>) -> Request<Body> {
    let mut request = Request::post("/payments")
        .header("idempotency-key", "shared-key")
        .body(Body::from("{}"))
        .unwrap();
    if let Some(auth) = auth {
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn default_tenant_scopes_by_authorization() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let alice = send(&app, keyed(Some("Bearer alice"))).await;
    let bob = send(&app, keyed(Some("Bearer bob"))).await;
    assert!(!alice.replayed());
    assert!(!bob.replayed(), "another tenant's key never replays");
    assert_ne!(alice.body, bob.body);
    assert_eq!(runs.get(), 2);

    let alice_again = send(&app, keyed(Some("Bearer alice"))).await;
    assert!(alice_again.replayed());
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_keyed_request_without_a_tenant_is_refused_unless_the_scope_is_shared() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    for _ in 0..2 {
        let anonymous = send(&app, keyed(None)).await;
        assert_eq!(anonymous.status, StatusCode::BAD_REQUEST);
        assert_eq!(anonymous.code(), "idempotency_tenant_missing");
        assert_eq!(
            anonymous.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(anonymous.header("idempotency-key"), Some("shared-key"));
        assert!(!anonymous.replayed());
    }
    assert_eq!(runs.get(), 0, "nothing ran");
    // Without a key, the request is not the layer's business: it passes through.
    let unkeyed = Request::post("/payments").body(Body::from("{}")).unwrap();
    assert_eq!(send(&app, unkeyed).await.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);

    // An optional header that is absent is the shared scope too.
    let optional = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .tenant(TenantFromHeader::new(HeaderName::from_static("x-api-key")).optional()),
    );
    let reply = send(&optional, keyed(None)).await;
    assert_eq!(reply.code(), "idempotency_tenant_missing");
    assert_eq!(runs.get(), 1);

    // Opted in: requests without Authorization share one scope.
    let runs = Runs::default();
    let shared =
        api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let first = send(&shared, keyed(None)).await;
    assert!(!first.replayed());
    let again = send(&shared, keyed(None)).await;
    assert!(
        again.replayed(),
        "requests without Authorization share one scope"
    );
    assert_eq!(again.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn tenant_from_header_rejects_requests_without_it() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .tenant(TenantFromHeader::new(HeaderName::from_static("x-api-key"))),
    );
    let reply = send(&app, keyed(None)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.code(), "idempotency_tenant_rejected");
    assert_eq!(reply.header("idempotency-key"), Some("shared-key"));
    assert_eq!(reply.outcome, Some(Outcome::TenantRejected));
    assert_eq!(runs.get(), 0);

    let with = |api_key: &str| {
        let mut request = keyed(None);
        request
            .headers_mut()
            .insert("x-api-key", api_key.parse().unwrap());
        request
    };
    assert!(!send(&app, with("one")).await.replayed());
    assert!(!send(&app, with("two")).await.replayed());
    assert!(send(&app, with("one")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[derive(Clone)]
struct AccountId(u64);

impl std::fmt::Display for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `Authorization: account <n>` is `AccountId(n)`.
fn verify(authorization: &str) -> Option<AccountId> {
    authorization
        .strip_prefix("account ")?
        .parse()
        .ok()
        .map(AccountId)
}

#[tokio::test]
async fn tenant_from_an_extension_set_by_auth_middleware() {
    let runs = Runs::default();
    // An unknown caller passes the middleware without an account: the layer rejects it.
    let app = Auth::new(verify, Unknown::PassThrough).around(api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new()).tenant(TenantFromExtension::<AccountId>::new()),
    ));
    assert!(!send(&app, keyed(Some("account 1"))).await.replayed());
    assert!(!send(&app, keyed(Some("account 2"))).await.replayed());
    assert!(send(&app, keyed(Some("account 1"))).await.replayed());
    let anonymous = send(&app, keyed(None)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn tenant_from_a_closure() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).tenant(
        |parts: &axum::http::request::Parts| match parts.uri.query() {
            Some(q) => Ok(TenantId::hashed(q)),
            None => Err(TenantRejection::new(StatusCode::FORBIDDEN, "no tenant")),
        },
    ));
    let request = |uri: &str| {
        Request::post(uri)
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap()
    };
    let reply = send(&app, request("/status/200")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["detail"], "no tenant");
    assert!(!send(&app, request("/status/200?t1")).await.replayed());
    assert!(send(&app, request("/status/200?t1")).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn problem_json_is_the_default_error_body() {
    let app = api(Runs::default()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let request = Request::post("/payments")
        .header("idempotency-key", "")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, request).await;
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let json = reply.json();
    assert_eq!(json["status"], 400);
    assert_eq!(json["code"], "idempotency_key_invalid");
    assert_eq!(json["title"], "Idempotency key invalid");
    assert!(json["type"].as_str().unwrap().starts_with("https://"));
    assert!(json["detail"].as_str().unwrap().contains("empty"));
}

#[tokio::test]
async fn a_custom_renderer_gives_an_error_envelope() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).error_renderer(
        |problem: &Problem| {
            let body = serde_json::json!({
                "detail": problem.detail(),
                "error_code": problem.code().as_str().to_uppercase(),
                "details": { "retry_after": problem.retry_after() },
            });
            Response::builder()
                .status(problem.status())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Bytes::from(body.to_string()))
                .unwrap()
        },
    ));
    let post = |body: &'static str| {
        Request::post("/payments")
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "k")
            .body(Body::from(body))
            .unwrap()
    };
    send(&app, post("{}")).await;
    let reply = send(&app, post("{\"x\":1}")).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("idempotency-key"), Some("k"));
    let json = reply.json();
    assert_eq!(json["error_code"], "IDEMPOTENCY_KEY_REUSE");
    assert!(
        json["detail"]
            .as_str()
            .unwrap()
            .contains("different request")
    );
    assert_eq!(json["details"]["retry_after"], serde_json::Value::Null);
}

/// What a store holds for a tenant depends on the layer's secret: two layers with different
/// secrets never see each other's records, and an operator finds them only with the secret.
#[tokio::test]
async fn the_tenant_secret_keys_what_the_store_holds() {
    use tower_idempotency::{DefaultTenant, Operator};

    let store = MemoryStore::new();
    let runs = Runs::default();
    let one =
        api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).tenant_secret([1u8; 32]));
    let two =
        api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).tenant_secret([2u8; 32]));
    let first = send(&one, keyed(Some("Basic dXNlcjpodW50ZXIy"))).await;
    assert!(
        !send(&two, keyed(Some("Basic dXNlcjpodW50ZXIy")))
            .await
            .replayed()
    );
    let again = send(&one, keyed(Some("Basic dXNlcjpodW50ZXIy"))).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(runs.get(), 2);

    // The stored tenant is neither the extractor's digest nor the public default's sealing.
    let scope = DefaultTenant::scope_for("Basic dXNlcjpodW50ZXIy");
    let with_secret = Operator::new(store.clone()).tenant_secret([1u8; 32]);
    let report = with_secret.lookup(scope, "shared-key").await.unwrap();
    assert!(report.is_some_and(|r| !r.is_in_flight()));
    let without = Operator::new(store.clone());
    assert!(without.lookup(scope, "shared-key").await.unwrap().is_none());
    // The layer's own operator has its secret.
    let layer = IdempotencyLayer::new(store.clone()).tenant_secret([1u8; 32]);
    let report = layer.operator().lookup(scope, "shared-key").await.unwrap();
    assert!(report.is_some_and(|r| !r.is_in_flight()));

    // A secret that is too short is refused when the layer is configured.
    let short = std::panic::catch_unwind(|| {
        IdempotencyLayer::new(MemoryStore::new()).tenant_secret(b"short")
    });
    assert!(short.is_err());
}

/// `IdempotencyKey::scoped()` is the same on every retry and differs between tenants that send
/// the same key: safe to pass on as a downstream API's idempotency key.
#[tokio::test]
async fn the_scoped_key_is_unique_per_tenant_and_stable_across_retries() {
    use axum::Extension;
    use axum::routing::post;
    use tower_idempotency::IdempotencyKey;

    let runs = Runs::default();
    let counted = runs.clone();
    let app = axum::Router::new()
        .route(
            "/payments",
            post(move |Extension(key): Extension<IdempotencyKey>| {
                let runs = counted.clone();
                async move {
                    runs.bump();
                    (StatusCode::CREATED, key.scoped())
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()).tenant_secret([9u8; 32]));
    let alice = send(&app, keyed(Some("Bearer alice"))).await;
    let bob = send(&app, keyed(Some("Bearer bob"))).await;
    let alice_retry = send(&app, keyed(Some("Bearer alice"))).await;
    assert!(alice_retry.replayed());
    assert_eq!(alice_retry.body, alice.body);
    assert_ne!(
        alice.body, bob.body,
        "the same key, two tenants, two downstream keys"
    );
    assert_eq!(alice.body.len(), 64);
    assert!(alice.body.iter().all(u8::is_ascii_hexdigit));
    assert!(!String::from_utf8_lossy(&alice.body).contains("shared-key"));
    assert_eq!(runs.get(), 2);
}

/// A keyed request with each of `authorizations` as an `Authorization` field.
fn authorized(authorizations: &[&str]) -> Request<Body> {
    let mut request = keyed(None);
    for value in authorizations {
        let value = header::HeaderValue::from_str(value).unwrap();
        request.headers_mut().append(header::AUTHORIZATION, value);
    }
    request
}

/// `Authorization` sent twice is `400 idempotency_tenant_rejected`, its key echoed, nothing run.
#[tokio::test]
async fn authorization_sent_twice_is_refused() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let pairs = [
        ["Bearer a", "Bearer a"],
        ["Bearer a", "Bearer b"],
        ["", "Bearer b"],
        ["Bearer null", "Bearer b"],
    ];
    for pair in pairs {
        let reply = send(&app, authorized(&pair)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{pair:?}");
        assert_eq!(reply.code(), "idempotency_tenant_rejected", "{pair:?}");
        assert_eq!(reply.header("idempotency-key"), Some("shared-key"));
    }
    let mut among_many = authorized(&["Bearer a", "Bearer b"]);
    for i in 0..30 {
        let name = HeaderName::from_bytes(format!("x-f{i}").as_bytes()).unwrap();
        among_many.headers_mut().insert(name, i.into());
    }
    let reply = send(&app, among_many).await;
    assert_eq!(reply.code(), "idempotency_tenant_rejected");
    assert_eq!(runs.get(), 0);
}

/// Whitespace around `Authorization` is not part of the tenant (RFC 9110 §5.5): the retry replays.
#[tokio::test]
async fn whitespace_around_authorization_is_not_part_of_the_tenant() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let first = send(&app, authorized(&["Bearer tok"])).await;
    assert_eq!(first.status, StatusCode::CREATED);
    for padded in [" Bearer tok\t", "\tBearer tok  "] {
        let retry = send(&app, authorized(&[padded])).await;
        assert!(retry.replayed(), "{padded:?}: {retry:?}");
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(runs.get(), 1);
}

/// Through a real server: one credential, one tenant, whatever its name's case; twice is refused.
#[tokio::test]
async fn tenants_through_a_real_server() {
    use support::raw;
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let server = support::Server::start(app, Default::default()).await;
    let send = |authorizations: &[(&str, &str)]| {
        let mut headers = vec![("Idempotency-Key", "srv-t")];
        headers.extend_from_slice(authorizations);
        raw::exchange(server.addr, raw::post("/payments", &headers, "{}"))
    };
    let code = |reply: &raw::RawReply| {
        let problem: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        problem["code"].as_str().unwrap().to_owned()
    };
    let first = send(&[("Authorization", "Bearer tok")]).await;
    assert_eq!(first.status, 201, "{first:?}");
    for name in ["AUTHORIZATION", "authorization"] {
        let again = send(&[(name, "Bearer tok")]).await;
        assert!(again.replayed(), "{name}: {again:?}");
        assert_eq!(again.body, first.body);
    }
    let other = send(&[("Authorization", "Bearer tok2")]).await;
    assert_eq!(other.status, 201, "{other:?}");
    assert!(!other.replayed());
    let twice = [
        ("Authorization", "Bearer tok"),
        ("authorization", "Bearer tok"),
    ];
    let twice = send(&twice).await;
    assert_eq!(twice.status, 400, "{twice:?}");
    assert_eq!(code(&twice), "idempotency_tenant_rejected");
    let null = send(&[("Authorization", "Bearer null")]).await;
    assert_eq!(null.status, 400, "{null:?}");
    assert_eq!(code(&null), "idempotency_tenant_missing");
    assert_eq!(runs.get(), 2);
}
