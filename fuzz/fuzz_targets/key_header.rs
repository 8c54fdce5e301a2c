//! The `Idempotency-Key` header parser: never panics; whatever it accepts is a valid key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::fuzzing::parse_key;

fuzz_target!(|data: &[u8]| {
    let Some(key) = parse_key(data) else {
        return;
    };
    assert!((1..=tower_idempotency::MAX_KEY_LEN).contains(&key.len()));
    assert!(key.bytes().all(|b| (b'!'..=b'~').contains(&b)));
    // A key without quotes or commas reads back as itself when sent bare.
    if !key.contains(['"', ',']) {
        assert_eq!(parse_key(key.as_bytes()).as_deref(), Some(&*key));
    }
    // Any accepted key reads back as itself when sent as a Structured-Field string.
    let mut quoted = String::from("\"");
    for c in key.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    assert_eq!(parse_key(quoted.as_bytes()).as_deref(), Some(&*key));
});
