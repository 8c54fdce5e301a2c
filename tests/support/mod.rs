//! Helpers shared by every test: a run counter, finished responses and a way to send requests,
//! the skip-unless-the-server-is-there helper, the behaviour tests' API (`app`), the fleet
//! scenarios every shared store runs (`fleet`), a store wrapper that injects faults
//! (`faults`), a real server on loopback and its client (`serve`), HTTP/1.1 by hand on a raw
//! `TcpStream` (`raw`), a payments API on
//! PostgreSQL that completes its records with `Claim` (`payments`, feature `sqlx`), a stand-in
//! authentication middleware (`auth`), a charging API that records its side effects
//! (`charge`), servers in child processes (`child`), the shared stores
//! of `scripts/test-services` (`shared`), the scenarios both SQL stores run (`sql`), Redis
//! servers and clusters of a test's own (`cluster`), a TCP proxy whose connections can be
//! frozen (`proxy`) and what the tests of such connections share (`frozen`).
//!
//! Test files say `#[macro_use] mod support;` (the macros are `fleet_scenarios!` and
//! `sql_scenarios!`).
#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IDEMPOTENT_REPLAYED, LockToken};

pub mod app;
pub mod auth;
pub mod charge;
pub mod child;
#[cfg(feature = "redis")]
pub mod cluster;
pub mod faults;
pub mod frozen;
#[cfg(feature = "sqlx")]
pub mod payments;
pub mod proxy;
pub mod raw;
pub mod server;
#[macro_use]
pub mod fleet;
pub mod serve;
pub mod shared;
#[cfg(any(feature = "postgres", feature = "sqlx"))]
#[macro_use]
pub mod sql;

pub use app::{api, post_with_key};
pub use faults::{Fault, FaultyStore, Op};
pub use fleet::*;
pub use serve::{Served, Transport, Via, serve};
pub use server::{Server, rss_kib};

/// Counts handler runs.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The value of the environment variable `var` (a server's URL, a binary), or `None` after
/// printing that `test` is skipped.
pub fn server_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{test}: skipped, {var} is not set (run it through scripts/test-services)");
            None
        }
    }
}

/// The most frequent count of `counts` (of allocations, say: a map that grows now and then adds
/// one to a few).
pub fn most_frequent(counts: &[usize]) -> usize {
    let mut by_count = std::collections::BTreeMap::new();
    for &count in counts {
        *by_count.entry(count).or_insert(0) += 1;
    }
    by_count
        .into_iter()
        .max_by_key(|&(_, times)| times)
        .map(|(count, _)| count)
        .unwrap()
}

/// A key no other test or run uses.
pub fn unique_key(label: &str) -> String {
    format!("{label}-{}", LockToken::random())
}

/// Polls until `check` is true, for at most `limit`.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A finished response: status, headers, the whole body and the layer's outcome.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The trailers after the body, if any came.
    pub trailers: Option<HeaderMap>,
    pub outcome: Option<tower_idempotency::Outcome>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn replayed(&self) -> bool {
        self.header(IDEMPOTENT_REPLAYED.as_str()) == Some("true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The `code` of a problem+json body, whose `status` member must match.
    pub fn code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let json = self.json();
        assert_eq!(
            json["status"],
            self.status.as_u16(),
            "status member matches"
        );
        json["code"].as_str().unwrap().to_owned()
    }

    /// Asserts this is a replay of `original`: same status, same headers (plus the replay
    /// marker), same body bytes.
    pub fn assert_replay_of(&self, original: &Reply) {
        assert_eq!(self.status, original.status, "replayed status");
        assert!(
            self.replayed(),
            "a replay is marked Idempotent-Replayed: true"
        );
        let mut headers = self.headers.clone();
        headers.remove(IDEMPOTENT_REPLAYED);
        assert_eq!(headers, original.headers, "replayed headers");
        assert_eq!(self.body, original.body, "replayed body");
    }

    /// Asserts this is `409 idempotency_key_in_progress` with `Retry-After`.
    pub fn assert_in_progress(&self) {
        assert_eq!(self.status, StatusCode::CONFLICT, "{self:?}");
        assert_eq!(self.code(), "idempotency_key_in_progress");
        assert!(
            self.headers.contains_key(header::RETRY_AFTER),
            "409 carries Retry-After"
        );
    }

    /// Asserts this is `503 idempotency_store_unavailable` with `Retry-After`.
    pub fn assert_store_unavailable(&self) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{self:?}");
        assert_eq!(self.code(), "idempotency_store_unavailable");
        assert!(
            self.headers.contains_key(header::RETRY_AFTER),
            "503 carries Retry-After"
        );
    }
}

/// Sends `request` through a clone of `app` and reads the response to the end.
pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    Reply {
        status: parts.status,
        outcome: parts.extensions.get().copied(),
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}
