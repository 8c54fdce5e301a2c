//! The inner service's readiness: a keyed request holds none of the inner service's capacity (a
//! `Buffer`'s slot, a concurrency limit's permit) while its body arrives, the store answers or a
//! duplicate waits; it makes the service ready once it holds its key, then calls it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

/// A request body whose chunks arrive when the test sends them; it ends when its sender goes.
struct Chunks(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

fn body() -> (mpsc::UnboundedSender<Bytes>, Chunks) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Chunks(rx))
}

fn whole(text: &'static str) -> Chunks {
    let (tx, body) = body();
    tx.send(Bytes::from_static(text.as_bytes())).unwrap();
    body
}

fn post(key: Option<&str>, body: Chunks) -> Request<Chunks> {
    let mut request = Request::post("/orders").header("authorization", "Bearer a");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(body).unwrap()
}

/// The handler: reads the body, counts its run, answers `201` with the run's number, after
/// `work` for a keyed request.
fn handler(
    runs: Arc<AtomicUsize>,
    work: Duration,
) -> impl Service<
    Request<RequestBody<Chunks>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    tower::service_fn(move |request: Request<RequestBody<Chunks>>| {
        let runs = runs.clone();
        let keyed = request.headers().contains_key("idempotency-key");
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            if keyed {
                tokio::time::sleep(work).await;
            }
            let text = format!("run {run}: {}", String::from_utf8_lossy(&body));
            let mut response = Response::new(Full::new(Bytes::from(text)));
            *response.status_mut() = StatusCode::CREATED;
            Ok(response)
        }
    })
}

/// Calls `service` (a clone of its own) as a server does: made ready, then called.
async fn call<S>(service: S, request: Request<Chunks>) -> (StatusCode, String)
where
    S: Service<Request<Chunks>, Error = BoxError> + Clone,
    S::Response: Into<Response<tower_idempotency::ResponseBody<Full<Bytes>>>>,
{
    let response = service.oneshot(request).await.unwrap().into();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// With tower's `Buffer` of one slot inside the layer (how a service that is not `Clone` is
/// shared), a keyed request whose body is slow to come holds no slot: another request goes
/// through meanwhile, and the slow one runs once its body is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_holds_no_readiness_while_its_body_arrives() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .buffer(1)
        .service(handler(runs.clone(), Duration::ZERO));

    let (tx, slow_body) = body();
    tx.send(Bytes::from_static(b"sl")).unwrap();
    let slow = tokio::spawn({
        let service = service.clone();
        async move { call(service.clone(), post(Some("slow"), slow_body)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let other = tokio::time::timeout(
        Duration::from_secs(10),
        call(service.clone(), post(None, whole("other"))),
    )
    .await
    .expect("another request is not held behind a keyed body still arriving");
    assert_eq!(other, (StatusCode::CREATED, "run 1: other".to_owned()));
    let keyed = tokio::time::timeout(
        Duration::from_secs(10),
        call(service.clone(), post(Some("other-key"), whole("keyed"))),
    )
    .await
    .expect("nor is another keyed request");
    assert_eq!(keyed, (StatusCode::CREATED, "run 2: keyed".to_owned()));
    assert!(!slow.is_finished());

    tx.send(Bytes::from_static(b"ow")).unwrap();
    drop(tx);
    assert_eq!(
        slow.await.unwrap(),
        (StatusCode::CREATED, "run 3: slow".to_owned())
    );
}

/// A duplicate that waits for the first request (`wait_for_in_flight`) holds no slot of the
/// inner service while it waits: an unrelated request goes through before the first ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_holds_no_readiness() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(30)),
        )
        .buffer(1)
        .service(handler(runs.clone(), Duration::from_millis(1500)));

    let first = tokio::spawn({
        let service = service.clone();
        async move { call(service.clone(), post(Some("k"), whole("a"))).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = tokio::spawn({
        let service = service.clone();
        async move { call(service.clone(), post(Some("k"), whole("a"))).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let other = call(service.clone(), post(None, whole("b"))).await;
    assert_eq!(other, (StatusCode::CREATED, "run 2: b".to_owned()));
    assert!(
        !first.is_finished() && !duplicate.is_finished(),
        "the unrelated request went through while the duplicate waited"
    );
    assert_eq!(
        first.await.unwrap(),
        (StatusCode::CREATED, "run 1: a".to_owned())
    );
    assert_eq!(
        duplicate.await.unwrap(),
        (StatusCode::CREATED, "run 1: a".to_owned())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A concurrency limit inside the layer: every keyed request makes its own service ready
/// before it calls it, and each runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limited_service_runs_each_key_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .map_err(BoxError::from)
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .concurrency_limit(2)
        .service(handler(runs.clone(), Duration::from_millis(20)));
    let calls = (0..40).map(|i| {
        let service = service.clone();
        tokio::spawn(async move {
            let key = format!("key-{}", i % 10);
            let mut service = service;
            let response = service
                .ready()
                .await
                .unwrap()
                .call(post(Some(&key), whole("x")))
                .await
                .unwrap();
            (
                response.status(),
                response.headers().contains_key("idempotent-replayed"),
            )
        })
    });
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    for answer in answers {
        let (status, _) = answer.unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "{status}"
        );
    }
}

/// A service whose `poll_ready` fails for keyed work: the error reaches the caller, the key is
/// released (the retry runs once the service is ready again), and nothing ran.
#[derive(Clone)]
struct Refusing {
    refuse: Arc<AtomicBool>,
    runs: Arc<AtomicUsize>,
}

impl Service<Request<RequestBody<Chunks>>> for Refusing {
    type Response = Response<Full<Bytes>>;
    type Error = &'static str;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.refuse.load(Ordering::SeqCst) {
            Poll::Ready(Err("not ready"))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _: Request<RequestBody<Chunks>>) -> Self::Future {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            let mut response = Response::new(Full::new(Bytes::from(format!("run {run}"))));
            *response.status_mut() = StatusCode::CREATED;
            Ok(response)
        })
    }
}

#[tokio::test]
async fn a_service_that_fails_to_be_ready_releases_the_key() {
    let refusing = Refusing {
        refuse: Arc::new(AtomicBool::new(false)),
        runs: Arc::new(AtomicUsize::new(0)),
    };
    let mut service = IdempotencyLayer::new(MemoryStore::new()).layer(refusing.clone());
    // Ready when the server asks; not ready any more when the request holds its key.
    service.ready().await.unwrap();
    refusing.refuse.store(true, Ordering::SeqCst);
    let err = service.call(post(Some("k"), whole("a"))).await.unwrap_err();
    assert_eq!(err, "not ready");
    assert_eq!(refusing.runs.load(Ordering::SeqCst), 0);

    refusing.refuse.store(false, Ordering::SeqCst);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let ready = service.ready().await.unwrap();
        answers.push(ready.call(post(Some("k"), whole("a"))).await.unwrap());
    }
    assert_eq!(answers[0].status(), StatusCode::CREATED);
    assert!(!answers[0].headers().contains_key("idempotent-replayed"));
    assert!(answers[1].headers().contains_key("idempotent-replayed"));
    assert_eq!(refusing.runs.load(Ordering::SeqCst), 1);
}
