//! Reading and validating the `Idempotency-Key` header.
//!
//! A key is 1..=255 visible ASCII characters (`!` to `~`, no space). It may be sent as a bare
//! token (`abc`, as most APIs write it) or as a Structured-Field string (`"abc"`, as the IETF
//! draft writes it), which is unquoted before validation. A comma outside quotes means that
//! several header lines were combined into one, which counts as sending the header twice.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::store::RecordKey;
use crate::tenant::TenantId;

/// The longest key accepted, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// Why a request's key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// The header is absent.
    Missing,
    /// The header is present but its value is not a valid key.
    Invalid(&'static str),
}

/// A valid key: the unquoted key, and the header value exactly as the client sent it.
#[derive(Debug, Clone)]
pub(crate) struct ParsedKey {
    pub(crate) key: Arc<str>,
    pub(crate) raw: HeaderValue,
}

/// Reads the key header `name` from `headers`.
pub(crate) fn parse(headers: &HeaderMap, name: &HeaderName) -> Result<ParsedKey, KeyError> {
    let mut values = headers.get_all(name).iter();
    let raw = match (values.next(), values.next()) {
        (None, _) => return Err(KeyError::Missing),
        (Some(_), Some(_)) => return Err(KeyError::Invalid("the header was sent more than once")),
        (Some(raw), None) => raw,
    };
    let key = parse_value(raw.as_bytes())?;
    Ok(ParsedKey {
        key,
        raw: raw.clone(),
    })
}

/// Validates one header value and returns the unquoted key.
pub(crate) fn parse_value(value: &[u8]) -> Result<Arc<str>, KeyError> {
    let value = value.trim_ascii();
    let unquoted;
    let key = match value.first() {
        Some(b'"') => {
            unquoted = unquote(value)?;
            &unquoted[..]
        }
        _ if value.contains(&b',') => {
            return Err(KeyError::Invalid("the header was sent more than once"));
        }
        _ => value,
    };
    validate(key)?;
    // `validate` accepts only ASCII, so this conversion cannot fail.
    std::str::from_utf8(key)
        .map(Arc::from)
        .map_err(|_| KeyError::Invalid("the key must be visible ASCII"))
}

/// The request's idempotency key, put in the request's extensions before the handler runs, so
/// that the handler can pass it on (for example as the idempotency key of a payment provider).
///
/// With axum, extract it with `Extension<IdempotencyKey>`:
///
/// ```
/// use axum::{Extension, Router, routing::post};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};
///
/// async fn create_payment(Extension(key): Extension<IdempotencyKey>) -> String {
///     format!("charging with idempotency key {}", key.as_str())
/// }
///
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(IdempotencyLayer::new(MemoryStore::new()));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    key: Arc<str>,
    tenant: TenantId,
}

impl IdempotencyKey {
    pub(crate) fn from_record(record: &RecordKey) -> Self {
        Self {
            key: record.shared_key().clone(),
            tenant: *record.tenant(),
        }
    }

    /// The key, unquoted.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The tenant scope the key lives in.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}

impl std::fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyKey")
            .field("key", &self.key)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

/// Unquotes a Structured-Field string (RFC 8941 §3.3.3): `"` ... `"`, with `\"` and `\\` escapes.
fn unquote(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len().min(MAX_KEY_LEN + 1));
    let mut bytes = value[1..].iter();
    loop {
        match bytes.next() {
            None => return Err(KeyError::Invalid("the quoted key has no closing quote")),
            Some(b'\\') => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(c),
                _ => return Err(KeyError::Invalid("the quoted key has an invalid escape")),
            },
            Some(b'"') => break,
            Some(&c) => out.push(c),
        }
        if out.len() > MAX_KEY_LEN {
            return Err(KeyError::Invalid("the key is longer than 255 characters"));
        }
    }
    let rest = bytes.as_slice().trim_ascii_start();
    match rest.first() {
        None => Ok(out),
        Some(b',') => Err(KeyError::Invalid("the header was sent more than once")),
        Some(_) => Err(KeyError::Invalid(
            "the quoted key is followed by other characters",
        )),
    }
}

fn validate(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Invalid("the key is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::Invalid("the key is longer than 255 characters"));
    }
    if !key.iter().all(|b| matches!(b, b'!'..=b'~')) {
        return Err(KeyError::Invalid(
            "the key must be visible ASCII characters without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(value: &[u8]) -> String {
        parse_value(value).unwrap().to_string()
    }

    fn invalid(value: &[u8]) -> bool {
        matches!(parse_value(value), Err(KeyError::Invalid(_)))
    }

    #[test]
    fn bare_and_quoted_keys() {
        assert_eq!(ok(b"abc"), "abc");
        assert_eq!(ok(b"\"abc\""), "abc");
        assert_eq!(ok(b"\"a\\\"b\\\\c\""), "a\"b\\c");
        assert_eq!(
            ok(b"8e03978e-40d5-43e8-bc93-6894a57f9324"),
            "8e03978e-40d5-43e8-bc93-6894a57f9324"
        );
        assert_eq!(ok(b"a\"b"), "a\"b");
    }

    #[test]
    fn lengths() {
        assert_eq!(ok(&[b'k'; 255]).len(), 255);
        assert!(invalid(&[b'k'; 256]));
        let mut quoted = vec![b'"'];
        quoted.extend([b'k'; 255]);
        quoted.push(b'"');
        assert_eq!(ok(&quoted).len(), 255);
        quoted.insert(1, b'k');
        assert!(invalid(&quoted));
        assert!(invalid(b""));
        assert!(invalid(b"\"\""));
        assert_eq!(ok(b"k"), "k");
    }

    #[test]
    fn characters() {
        assert!(invalid(b"a b"));
        assert!(invalid(b"\"a b\""));
        assert!(invalid(b"a\tb"));
        assert!(invalid(b"a\x7fb"));
        assert!(invalid("ключ".as_bytes()));
        assert!(invalid(b"\"abc"));
        assert!(invalid(b"\"abc\"x"));
        assert!(invalid(b"\"ab\\c\""));
    }

    #[test]
    fn combined_values_count_as_repeated() {
        assert!(invalid(b"a, b"));
        assert!(invalid(b"a,b"));
        assert!(invalid(b"\"a\", \"b\""));
        assert_eq!(ok(b"\"a,b\""), "a,b");
    }

    #[test]
    fn header_map() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(parse(&headers, &name).unwrap_err(), KeyError::Missing);
        headers.insert(&name, HeaderValue::from_static("\"k1\""));
        let parsed = parse(&headers, &name).unwrap();
        assert_eq!(&*parsed.key, "k1");
        assert_eq!(parsed.raw, "\"k1\"");
        headers.append(&name, HeaderValue::from_static("k2"));
        assert!(matches!(parse(&headers, &name), Err(KeyError::Invalid(_))));
    }
}
