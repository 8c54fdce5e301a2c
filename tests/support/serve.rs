//! A real server on loopback ([`Server`], `axum::serve` on 127.0.0.1:0) and a real client for
//! it: requests go over TCP through hyper-util's client and come back as a [`Reply`]; a raw
//! `TcpStream` (`support::raw`) sends a request and hangs up. [`Via`] runs one test through
//! `oneshot` or a real server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{Reply, Server};

/// `app` served on a free loopback port (a [`Server`]) until this is dropped, with a client.
pub struct Served {
    pub addr: SocketAddr,
    client: Client<HttpConnector, Body>,
    _server: Server,
}

/// Serves `app` on 127.0.0.1, on a free port.
pub async fn serve(app: Router) -> Served {
    let server = Server::start(app, Default::default()).await;
    Served {
        addr: server.addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        _server: server,
    }
}

impl Served {
    /// Sends `request` (its URI a path, as for `oneshot`) over TCP and reads the whole response.
    /// The outcome is not on the wire: the reply's `outcome` is `None`. The `Date` that hyper
    /// adds (the second each response was sent) is left out, so that a replay compares with
    /// its original as the layer made them.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        let (mut parts, body) = request.into_parts();
        parts.uri = format!("http://{}{}", self.addr, parts.uri)
            .parse()
            .unwrap();
        let response = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .expect("the server answers");
        let (mut parts, body) = response.into_parts();
        parts.headers.remove(axum::http::header::DATE);
        let collected = body.collect().await.unwrap();
        Reply {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
            outcome: None,
        }
    }

    /// Writes `request` whole on a connection of its own and returns the connection: dropping
    /// it hangs up before the answer.
    pub async fn send_then_hang_up(&self, request: Request<Body>) -> TcpStream {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let mut head = format!("{} {} HTTP/1.1\r\nhost: test\r\n", parts.method, parts.uri);
        for (name, value) in &parts.headers {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        super::raw::send_only(self.addr, bytes).await
    }
}

/// How a test's requests reach its app.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// `oneshot` on a clone of the `Router`.
    Oneshot,
    /// A real server on loopback and hyper-util's client.
    Loopback,
}

/// An app, reached through `oneshot` or a real server on loopback.
#[derive(Clone)]
pub enum Via {
    Oneshot(Router),
    Loopback(Arc<Served>),
}

impl Via {
    /// `app`, reached by `transport` (served on loopback for [`Transport::Loopback`]).
    pub async fn new(app: Router, transport: Transport) -> Self {
        match transport {
            Transport::Oneshot => Via::Oneshot(app),
            Transport::Loopback => Via::Loopback(Arc::new(serve(app).await)),
        }
    }

    /// Sends `request` and reads the whole response.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        match self {
            Via::Oneshot(app) => super::send(app, request).await,
            Via::Loopback(server) => server.send(request).await,
        }
    }

    /// Sends `request` on a task of its own.
    pub fn spawn(&self, request: Request<Body>) -> JoinHandle<Reply> {
        let via = self.clone();
        tokio::spawn(async move { via.send(request).await })
    }
}
