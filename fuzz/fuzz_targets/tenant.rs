//! Tenant extraction from arbitrary header values: never panics, and is deterministic.
#![no_main]

use http::{HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use tower_idempotency::{DefaultTenant, TenantExtractor, TenantFromHeader};

fuzz_target!(|data: &[u8]| {
    // Up to three header values, separated by 0xff bytes.
    let mut builder = Request::builder();
    for value in data.split(|&b| b == 0xff).take(3) {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        builder = builder.header("authorization", value.clone()).header("x-tenant", value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let by_header = TenantFromHeader::new(HeaderName::from_static("x-tenant"));
    for extractor in [&DefaultTenant as &dyn TenantExtractor, &by_header] {
        let first = extractor.extract(&parts).map_err(|r| r.status());
        let again = extractor.extract(&parts).map_err(|r| r.status());
        assert_eq!(first, again);
    }
});
