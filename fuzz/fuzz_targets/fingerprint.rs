//! The request fingerprint: never panics, does not depend on how the body is chunked; the
//! canonical JSON form is its own canonical form, and a value a pointer leaves out may be
//! anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::fuzzing::{canonical_json, fingerprint};

/// Pointers the canonical writer walks beside the fuzzed bodies.
const POINTERS: &[&str] = &["/a", "/0", "/a/0/b", "/~0~1", "/"];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, body) = data.split_at(data.len().min(64));
    let method = ["POST", "PATCH", "PUT"][usize::from(head[0]) % 3];
    let content_type = ["application/json", "text/plain"][usize::from(head[1]) % 2];
    let uri = String::from_utf8_lossy(&head[2..]).into_owned();
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(uri.as_str())
        .header("content-type", content_type)
        .body(())
    else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let split = usize::from(head[0]).min(body.len());
    let chunked: &[&[u8]] = &[&body[..split], &body[split..]];
    for (canonical, ignore) in [(false, &[][..]), (true, &[][..]), (true, POINTERS)] {
        let whole = fingerprint(&parts, &[body], canonical, ignore);
        assert_eq!(whole, fingerprint(&parts, chunked, canonical, ignore));
    }

    if let Some(form) = canonical_json(body, &[]) {
        // The canonical form is JSON, and its own canonical form.
        assert_eq!(canonical_json(&form, &[]).as_ref(), Some(&form));
        // Leaving values out never makes a body fail, and changes nothing without pointers.
        let left_out = canonical_json(body, POINTERS).expect("pointers never fail a body");
        if !left_out.contains(&b'?') {
            assert_eq!(left_out, form);
        }
    }
});
