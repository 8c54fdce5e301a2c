//! The stored-response encoding that shared stores keep: decoding arbitrary bytes never panics
//! nor allocates beyond the input, and whatever decodes survives an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::StoredResponse;

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = StoredResponse::decode(data) {
        let encoded = response.encode();
        assert!(encoded.len() <= data.len(), "header names are lowercased, never longer");
        assert_eq!(StoredResponse::decode(&encoded).unwrap(), response);
    }
});
