//! What is retried, how long to wait, and the keys: the rules the tower layer and the
//! reqwest middleware share.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::time::Instant;

use super::Config;
use crate::config::IDEMPOTENT_REPLAYED;
use crate::util::{Hex, random_bytes};

/// Whether a response is worth another attempt with the same key: `409` with `Retry-After`
/// (the first attempt still runs; any `409` with `conflicts`), `429`, and `5xx` but `501` and
/// `505` (the server failed and released the key); never a replay, whatever its status (it is
/// the operation's stored answer). A `409` without `Retry-After` is final: the operation's own
/// conflict, or `idempotency_response_not_stored`.
pub(crate) fn should_retry(status: StatusCode, headers: &HeaderMap, conflicts: bool) -> bool {
    let retryable = match status {
        StatusCode::CONFLICT => conflicts || headers.contains_key(header::RETRY_AFTER),
        StatusCode::TOO_MANY_REQUESTS => true,
        StatusCode::NOT_IMPLEMENTED | StatusCode::HTTP_VERSION_NOT_SUPPORTED => false,
        status => status.is_server_error(),
    };
    retryable && !replayed(headers)
}

/// Whether the server marked the response `Idempotent-Replayed: true`.
pub(crate) fn replayed(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// The wait a `Retry-After` header asks for: delta-seconds, or an HTTP-date (a date already
/// past asks for no wait). `None` when absent or unreadable.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too large for u64 is a wait longer than any cap.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The attempts of one request, counted from the first one's start.
#[derive(Debug)]
pub(crate) struct Schedule {
    started: Instant,
    attempts: u32,
}

impl Schedule {
    pub(crate) fn start() -> Self {
        Self {
            started: Instant::now(),
            attempts: 0,
        }
    }

    /// Counts an attempt that was made.
    pub(crate) fn attempted(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the deadline ends: an attempt still in flight then is cut off. `None` for a
    /// deadline too far to be told (`Duration::MAX`).
    pub(crate) fn deadline(&self, config: &Config) -> Option<Instant> {
        self.started.checked_add(config.deadline)
    }

    /// The wait before the next attempt, after a retryable answer that asked to wait
    /// `retry_after` (if it did); `None` when the retries are spent or the next attempt would
    /// start past the deadline.
    pub(crate) fn next_wait(
        &self,
        config: &Config,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if self.attempts > config.max_retries {
            return None;
        }
        let wait = match retry_after {
            Some(wait) => wait.min(config.max_delay),
            None => jitter(backoff_ceiling(config, self.attempts)),
        };
        let next_start = self.started.elapsed().saturating_add(wait);
        (next_start < config.deadline).then_some(wait)
    }
}

/// The ceiling of the wait after `attempts` attempts: `base_delay × 2^(attempts − 1)`, capped
/// at `max_delay`.
fn backoff_ceiling(config: &Config, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
    config
        .base_delay
        .saturating_mul(factor)
        .min(config.max_delay)
}

/// Full jitter: a random wait between zero and `ceiling`.
fn jitter(ceiling: Duration) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    let [a, b, c, d, e, f, g, h, ..] = random_bytes();
    let random = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
    match nanos.checked_add(1) {
        Some(span) => Duration::from_nanos(random % span),
        None => Duration::from_nanos(random),
    }
}

/// A new key: a random (version 4) UUID, lowercase and hyphenated.
pub(crate) fn new_key() -> HeaderValue {
    let mut bytes = random_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
    let text = format!(
        "{}-{}-{}-{}-{}",
        Hex(&bytes[..4]),
        Hex(&bytes[4..6]),
        Hex(&bytes[6..8]),
        Hex(&bytes[8..10]),
        Hex(&bytes[10..16])
    );
    HeaderValue::from_str(&text).expect("hex digits and hyphens make a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
            .collect()
    }

    #[test]
    fn retried_statuses() {
        let none = HeaderMap::new();
        for code in [429, 500, 502, 503, 504, 507, 599] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(should_retry(status, &none, false), "{code} is retried");
        }
        for code in [
            200, 201, 204, 301, 400, 401, 403, 404, 408, 409, 410, 413, 422, 501, 505,
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(!should_retry(status, &none, false), "{code} is not retried");
        }
    }

    #[test]
    fn a_409_is_retried_when_it_asks_to_wait() {
        let in_progress = headers(&[("retry-after", "1")]);
        assert!(should_retry(StatusCode::CONFLICT, &in_progress, false));
        assert!(!should_retry(
            StatusCode::CONFLICT,
            &HeaderMap::new(),
            false
        ));
        assert!(should_retry(StatusCode::CONFLICT, &HeaderMap::new(), true));
    }

    #[test]
    fn a_replay_is_never_retried() {
        let replay = headers(&[("idempotent-replayed", "true")]);
        for code in [409, 429, 500, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(!should_retry(status, &replay, true), "replayed {code}");
        }
        assert!(replayed(&headers(&[("idempotent-replayed", "TRUE")])));
        assert!(!replayed(&headers(&[("idempotent-replayed", "false")])));
        assert!(!replayed(&HeaderMap::new()));
    }

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let of = |value: &str| retry_after(&headers(&[("retry-after", value)]));
        assert_eq!(of("3"), Some(Duration::from_secs(3)));
        assert_eq!(of(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            of("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(of("-1"), None);
        assert_eq!(of("+1"), None);
        assert_eq!(of("soon"), None);
        assert_eq!(of(""), None);
        assert_eq!(of("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let wait = of(&later).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = Config::default();
        let ceilings: Vec<_> = (1..=8).map(|n| backoff_ceiling(&config, n)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            ceilings,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(backoff_ceiling(&config, u32::MAX), ms(5000));
        for _ in 0..100 {
            assert!(jitter(ms(100)) <= ms(100));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        assert!(jitter(Duration::MAX) <= Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_stops_at_the_retry_count_and_the_deadline() {
        let config = Config {
            max_retries: 2,
            deadline: Duration::from_secs(10),
            ..Config::default()
        };
        let mut schedule = Schedule::start();
        schedule.attempted();
        assert!(schedule.next_wait(&config, None).unwrap() <= Duration::from_millis(100));
        assert_eq!(
            schedule.next_wait(&config, Some(Duration::from_secs(60))),
            Some(Duration::from_secs(5)),
            "Retry-After is capped at max_delay"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            schedule.next_wait(&config, Some(Duration::from_secs(4))),
            None,
            "a wait that would end past the deadline is not taken"
        );
        assert_eq!(
            schedule.next_wait(&config, Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        schedule.attempted();
        assert!(schedule.next_wait(&config, None).is_some());
        schedule.attempted();
        assert_eq!(schedule.attempts(), 3);
        assert_eq!(schedule.next_wait(&config, None), None, "two retries spent");
    }

    #[test]
    fn keys_are_version_4_uuids() {
        let key = new_key();
        let text = key.to_str().unwrap();
        assert_eq!(text.len(), 36);
        let groups: Vec<_> = text.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(
            text.bytes()
                .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(&text[14..15], "4");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(new_key(), key);
    }
}
