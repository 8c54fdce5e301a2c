//! What the benchmarks share: the handler, the requests, and the report of ratios that each
//! bench prints after its measurements.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cpu_time::ThreadTime;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};

/// The criterion settings every bench runs with: short enough that `cargo bench` finishes in
/// minutes on a small machine, and overridable from the command line.
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
        .configure_from_args()
}

/// The body sizes every workload runs with.
pub const SIZES: [(usize, &str); 4] = [
    (0, "0B"),
    (1024, "1KiB"),
    (64 * 1024, "64KiB"),
    (1024 * 1024, "1MiB"),
];

/// A request body of `len` bytes; `seed` changes its content, not its length.
pub fn body_of(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| b'a' + ((i as u8).wrapping_add(seed) % 26))
        .collect::<Vec<u8>>()
        .into()
}

/// A header value backed by shared bytes, as a server's parser hands them over: cloning it
/// bumps a reference count, as it does for a request read by hyper.
pub fn shared_value(value: &str) -> HeaderValue {
    let bytes = Bytes::from(value.to_owned());
    // The first clone of a `Bytes` made from a `Vec` moves it to shared storage.
    drop(bytes.clone());
    HeaderValue::from_maybe_shared(bytes).expect("valid header value")
}

/// A `POST /payments` with `key` and `body`.
pub fn request(key: &HeaderValue, body: &Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::post("/payments")
        .body(Full::new(body.clone()))
        .expect("valid request");
    let headers = req.headers_mut();
    headers.insert("idempotency-key", key.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    req
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The response a payments handler gives: `201` with `Location`, `Content-Type` and a small
/// JSON body.
pub fn created() -> (StatusCode, HeaderValue, Bytes) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let location = HeaderValue::try_from(format!("/payments/{id}")).expect("valid location");
    let body = Bytes::from(format!(r#"{{"id":{id},"status":"succeeded"}}"#));
    (StatusCode::CREATED, location, body)
}

/// The handler every stack runs: reads the whole request body, as a JSON handler does, and
/// answers [`created`].
pub async fn handler<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let body = req.into_body().collect().await.expect("body").to_bytes();
    std::hint::black_box(&body);
    let (status, location, body) = created();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(LOCATION, location);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// A stopwatch on the clock the single-threaded benchmarks use: the CPU time of the calling
/// thread by default, so that other processes on a shared machine do not inflate the times
/// (everything a benchmark measures runs on that thread); wall-clock time with
/// `BENCH_CLOCK=wall`.
pub enum Stopwatch {
    Cpu(ThreadTime),
    Wall(Instant),
}

impl Stopwatch {
    pub fn start() -> Self {
        static WALL: OnceLock<bool> = OnceLock::new();
        let wall = *WALL.get_or_init(|| std::env::var("BENCH_CLOCK").is_ok_and(|c| c == "wall"));
        if wall {
            Self::Wall(Instant::now())
        } else {
            Self::Cpu(ThreadTime::now())
        }
    }

    pub fn elapsed(&self) -> Duration {
        match self {
            Self::Cpu(start) => start.elapsed(),
            Self::Wall(start) => start.elapsed(),
        }
    }
}

/// The name of the clock [`Stopwatch`] uses, for the reports.
pub fn clock_name() -> &'static str {
    match Stopwatch::start() {
        Stopwatch::Cpu(_) => "thread CPU time",
        Stopwatch::Wall(_) => "wall-clock time",
    }
}

/// Reads the medians that criterion wrote during this run of the bench binary.
pub struct Report {
    dir: PathBuf,
    started: SystemTime,
}

impl Report {
    /// Notes the start of the run: only estimates written after it are read.
    pub fn start() -> Self {
        let dir = match std::env::var_os("CRITERION_HOME") {
            Some(home) => PathBuf::from(home),
            None => std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from)
                .join("criterion"),
        };
        Self {
            dir,
            started: SystemTime::now(),
        }
    }

    /// The median time, in nanoseconds, of benchmark `group/function/param` measured in this
    /// run, if it ran.
    pub fn median_ns(&self, group: &str, function: &str, param: &str) -> Option<f64> {
        let path = self
            .dir
            .join(group)
            .join(function)
            .join(param)
            .join("new/estimates.json");
        let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
        if modified < self.started {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    }
}

/// Formats a time in nanoseconds with a unit that suits it.
pub fn time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Formats an optional value, `-` when the benchmark did not run.
pub fn cell(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_owned())
}
