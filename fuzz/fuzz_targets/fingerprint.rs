//! The request fingerprint: never panics, does not depend on how the body is chunked, and the
//! canonical JSON form ignores key order and whitespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::fuzzing::fingerprint;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, body) = data.split_at(data.len().min(64));
    let method = ["POST", "PATCH", "PUT"][usize::from(head[0]) % 3];
    let uri = String::from_utf8_lossy(&head[1..]).into_owned();
    let Ok(request) = http::Request::builder().method(method).uri(uri.as_str()).body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let split = usize::from(head[0]).min(body.len());
    let whole = fingerprint(&parts, &[body], false);
    let chunked = fingerprint(&parts, &[&body[..split], &body[split..]], false);
    assert_eq!(whole, chunked);
    let canonical = fingerprint(&parts, &[body], true);
    assert_eq!(canonical, fingerprint(&parts, &[&body[..split], &body[split..]], true));
});
