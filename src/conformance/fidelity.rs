//! Fidelity: what goes into a record comes back exactly (statuses, headers, bodies), under any
//! key, and records of different keys and tenants never meet.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::check::*;
use crate::store::{IdempotencyStore, RecordKey};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

/// A completed record replays its response exactly: status, every header in order (three
/// `Set-Cookie` included), body bytes. Replaying does not consume it.
pub async fn replay_is_exact<S: IdempotencyStore>(store: S) {
    let key = record("replay");
    let fp = fingerprint("replay");
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    let response = sample_response("replay");
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        "complete",
    );
    for attempt in ["first replay", "second replay"] {
        let replayed = completed(store.begin(&key, &fp, LONG).await, attempt);
        same_response(&replayed, &response, attempt);
        let cookies: Vec<_> = replayed.headers().get_all("set-cookie").iter().collect();
        assert_eq!(
            cookies,
            ["a=1; Path=/", "b=2", "a=3"],
            "{attempt}: Set-Cookie values"
        );
    }
}

/// Statuses round-trip as they were: a `201` stays `201`, a `404` stays `404`.
pub async fn status_codes_round_trip<S: IdempotencyStore>(store: S) {
    for code in [200, 201, 204, 302, 404, 418, 999] {
        let status = StatusCode::from_u16(code).expect("a valid status");
        let body = Bytes::from(format!("status {code}"));
        let response = StoredResponse::new(status, HeaderMap::new(), body);
        round_trip(&store, &format!("status-{code}"), &response).await;
    }
}

/// A response too large to store round-trips as "omitted", with its status.
pub async fn omitted_response_round_trips<S: IdempotencyStore>(store: S) {
    let back = round_trip(
        &store,
        "omitted",
        &StoredResponse::omitted(StatusCode::CREATED),
    )
    .await;
    assert!(
        back.is_omitted(),
        "an omitted response came back as a full one"
    );
}

/// A response with no header and an empty body round-trips.
pub async fn empty_response_round_trips<S: IdempotencyStore>(store: S) {
    let response = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
    round_trip(&store, "empty", &response).await;
}

/// A response's trailers (fields after its body) round-trip, in order, beside its headers.
pub async fn trailers_round_trip<S: IdempotencyStore>(store: S) {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.append("x-checksum", HeaderValue::from_static("a"));
    trailers.append("x-checksum", HeaderValue::from_static("b"));
    let response = sample_response("trailers").with_trailers(trailers);
    round_trip(&store, "trailers", &response).await;
}

/// A 1 MiB body round-trips byte for byte.
pub async fn large_body_round_trips<S: IdempotencyStore>(store: S) {
    let body: Vec<u8> = (0..1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from(body));
    round_trip(&store, "large", &response).await;
}

/// A body holding every byte value, NUL and invalid UTF-8 included, round-trips exactly.
pub async fn binary_body_round_trips<S: IdempotencyStore>(store: S) {
    let mut body: Vec<u8> = (0..=255).collect();
    body.extend((0..=255u8).rev());
    body.extend_from_slice(b"\0\0\xff\xfe\r\n\x1b");
    let response = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from(body));
    round_trip(&store, "binary", &response).await;
}

/// 100 headers, repeated ones and non-ASCII (obs-text) values included, round-trip in order.
pub async fn many_headers_round_trip<S: IdempotencyStore>(store: S) {
    let mut headers = HeaderMap::new();
    for i in 0..90 {
        let name = HeaderName::try_from(format!("x-header-{i:03}")).expect("a valid name");
        headers.insert(name, HeaderValue::from(i));
    }
    for i in 0..8 {
        headers.append(
            "set-cookie",
            HeaderValue::from_str(&format!("c{i}={i}")).expect("valid"),
        );
    }
    headers.insert("x-empty", HeaderValue::from_static(""));
    headers.insert(
        "x-obs-text",
        HeaderValue::from_bytes(b"caf\xe9 \x80\xff").expect("valid"),
    );
    assert_eq!(headers.len(), 100);
    let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from_static(b"ok"));
    round_trip(&store, "headers", &response).await;
}

/// Keys made of every visible ASCII character (`{`, `}`, `:` included) are stored as they are,
/// and keys that differ only in them never meet.
pub async fn keys_with_every_visible_ascii_char<S: IdempotencyStore>(store: S) {
    let tenant = TenantId::hashed(unique("ascii"));
    let every: String = (0x21..=0x7e_u8).map(char::from).collect();
    let longest: String = every.chars().cycle().take(crate::MAX_KEY_LEN).collect();
    let keys = [
        every.as_str(),
        longest.as_str(),
        "{",
        "}",
        ":",
        "{}",
        "}{",
        "a:b",
        "a}:{b",
        "{a}",
        "a",
        "\"quoted\"",
        "\\",
        "%s%n",
        "'; --",
        "*?[]",
    ];
    let mut responses = Vec::new();
    for key in keys {
        let record = RecordKey::new(tenant, key);
        let fp = fingerprint(key);
        let token = acquired(store.begin(&record, &fp, LONG).await, key);
        let response = StoredResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(key.to_owned()),
        );
        done(
            store.complete(&record, token, response.clone(), LONG).await,
            key,
        );
        responses.push((record, fp, response));
    }
    for (record, fp, response) in &responses {
        let replayed = completed(store.begin(record, fp, LONG).await, record.key());
        same_response(&replayed, response, record.key());
    }
}

/// Two tenants with the same key have two records that never meet.
pub async fn tenants_do_not_meet<S: IdempotencyStore>(store: S) {
    let key = unique("tenants");
    let (a, b) = (
        RecordKey::new(TenantId::hashed(unique("tenant-a")), key.as_str()),
        RecordKey::new(TenantId::hashed(unique("tenant-b")), key.as_str()),
    );
    let (fp_a, fp_b) = (fingerprint("tenant-a"), fingerprint("tenant-b"));
    let token_a = acquired(store.begin(&a, &fp_a, LONG).await, "tenant a");
    let token_b = acquired(store.begin(&b, &fp_b, LONG).await, "tenant b, same key");
    lease_lost(
        store.release(&a, token_b).await,
        "tenant b's token on tenant a's record",
    );
    let (response_a, response_b) = (sample_response("tenant-a"), sample_response("tenant-b"));
    done(
        store.complete(&a, token_a, response_a.clone(), LONG).await,
        "complete a",
    );
    in_flight(
        store.begin(&b, &fp_b, LONG).await,
        "tenant b still in flight",
    );
    done(
        store.complete(&b, token_b, response_b.clone(), LONG).await,
        "complete b",
    );
    same_response(
        &completed(store.begin(&a, &fp_a, LONG).await, "a"),
        &response_a,
        "tenant a",
    );
    same_response(
        &completed(store.begin(&b, &fp_b, LONG).await, "b"),
        &response_b,
        "tenant b",
    );
}

/// 50 keys acquired at once are all acquired: records of different keys never block each other.
pub async fn distinct_keys_are_independent<S: IdempotencyStore>(store: S) {
    let store = Arc::new(store);
    let fp = fingerprint("distinct");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let key = record(&format!("distinct-{i}"));
            tokio::spawn(async move { store.begin(&key, &fp, LONG).await })
        })
        .collect();
    for task in tasks {
        acquired(
            task.await.expect("task panicked"),
            "one of 50 distinct keys",
        );
    }
}
