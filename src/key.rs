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
    pub(crate) key: KeyText,
    pub(crate) raw: HeaderValue,
}

/// The longest key kept inline, in bytes: a UUID (36) and most keys that APIs generate fit.
const INLINE: usize = 46;

/// A valid key's text (1..=255 visible ASCII characters). A key of up to 46 characters is kept
/// inline, so that the request, its record and its extension hold it without an allocation; a
/// longer one is shared.
#[derive(Clone)]
pub(crate) struct KeyText(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl KeyText {
    /// The text of `key`.
    pub(crate) fn new(key: &str) -> Self {
        match key.len() {
            len if len <= INLINE => Self::inline(key.as_bytes()),
            _ => Self(Repr::Shared(key.into())),
        }
    }

    /// The text of `key`, which [`validate`] accepted: visible ASCII, so a key kept inline is
    /// copied without a check; `None` for bytes that are not UTF-8.
    #[inline]
    fn from_ascii(key: &[u8]) -> Option<Self> {
        match key.len() {
            len if len <= INLINE => Some(Self::inline(key)),
            _ => std::str::from_utf8(key).ok().map(Self::new),
        }
    }

    /// The text of `key`, shared rather than copied when it is too long to keep inline.
    pub(crate) fn from_shared(key: Arc<str>) -> Self {
        match key.len() {
            len if len <= INLINE => Self::inline(key.as_bytes()),
            _ => Self(Repr::Shared(key)),
        }
    }

    /// `key` inline: at most [`INLINE`] bytes, valid UTF-8.
    fn inline(key: &[u8]) -> Self {
        let mut bytes = [0; INLINE];
        bytes[..key.len()].copy_from_slice(key);
        Self(Repr::Inline {
            len: key.len() as u8,
            bytes,
        })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(key) => key.as_bytes(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match &self.0 {
            // Inline bytes are a `str`'s or a validated key's, whole: this cannot fail.
            Repr::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Repr::Shared(key) => key,
        }
    }
}

impl PartialEq for KeyText {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for KeyText {}

impl std::hash::Hash for KeyText {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for KeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for KeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads the key header `name` from `headers`.
pub(crate) fn parse(headers: &HeaderMap, name: &HeaderName) -> Result<ParsedKey, KeyError> {
    let raw = match crate::util::first_two(headers, name) {
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
pub(crate) fn parse_value(value: &[u8]) -> Result<KeyText, KeyError> {
    let value = value.trim_ascii();
    // Most keys are bare and valid: told in one pass. Any other value takes the checks below,
    // which name what is wrong with it.
    if (1..=MAX_KEY_LEN).contains(&value.len())
        && value[0] != b'"'
        && visible_without_comma(value)
        && let Some(key) = KeyText::from_ascii(value)
    {
        return Ok(key);
    }
    let mut unquoted;
    let key = match value.first() {
        Some(b'"') => {
            unquoted = [0; MAX_KEY_LEN];
            let len = unquote(value, &mut unquoted)?;
            &unquoted[..len]
        }
        _ if value.contains(&b',') => {
            return Err(KeyError::Invalid("the header was sent more than once"));
        }
        _ => value,
    };
    validate(key)?;
    // `validate` accepts only ASCII, so this conversion cannot fail.
    KeyText::from_ascii(key).ok_or(KeyError::Invalid("the key must be visible ASCII"))
}

/// The request's idempotency key, put in the request's extensions before the handler runs.
///
/// To pass it on as the idempotency key of a downstream API (a payment provider), use
/// [`scoped`](Self::scoped), which is unique per tenant, never the client's key itself.
/// With axum, extract it with `Extension<IdempotencyKey>`:
///
/// ```
/// use axum::{Extension, Router, routing::post};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};
///
/// async fn create_payment(Extension(key): Extension<IdempotencyKey>) -> String {
///     format!("charging with the provider's idempotency key {}", key.scoped())
/// }
///
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(IdempotencyLayer::new(MemoryStore::new()));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    key: KeyText,
    tenant: TenantId,
}

impl IdempotencyKey {
    pub(crate) fn from_record(record: &RecordKey) -> Self {
        Self {
            key: record.text().clone(),
            tenant: *record.tenant(),
        }
    }

    /// The key, unquoted.
    pub fn as_str(&self) -> &str {
        self.key.as_str()
    }

    /// The tenant scope the key lives in.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// A value unique to this key in this tenant's scope, to pass on as the idempotency key of
    /// a downstream API (a payment provider, say): 64 lowercase hex characters.
    ///
    /// Pass this on, not [`as_str`](Self::as_str). At the provider, every tenant of your app
    /// shares your one account, so the client's own key would let tenant B, who knows or
    /// guesses tenant A's key, take it first: A's charge would then fail, or return B's result.
    /// This value is a SHA-256 digest of the tenant's sealed scope and the key: the same on
    /// every retry and on every server of a fleet, different for every tenant, and not
    /// computable by another tenant (it needs the tenant's credential, and the layer's
    /// [`tenant_secret`](crate::IdempotencyLayer::tenant_secret) when one is set).
    ///
    /// ```
    /// use axum::{Extension, Router, routing::post};
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};
    ///
    /// async fn create_payment(Extension(key): Extension<IdempotencyKey>) -> String {
    ///     let provider_key = key.scoped(); // e.g. the provider's `Idempotency-Key` header
    ///     format!("charging with idempotency key {provider_key}")
    /// }
    ///
    /// let app: Router = Router::new()
    ///     .route("/payments", post(create_payment))
    ///     .layer(IdempotencyLayer::new(MemoryStore::new()));
    /// ```
    pub fn scoped(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new_with_prefix(b"tower-idempotency:scoped-key\0")
            .chain_update(self.tenant.as_bytes())
            .chain_update(self.key.as_bytes())
            .finalize();
        crate::util::hex(&digest)
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
        f.write_str(self.key.as_str())
    }
}

/// Unquotes a Structured-Field string (RFC 8941 §3.3.3): `"` ... `"`, with `\"` and `\\` escapes,
/// into `out`; returns the unquoted length.
fn unquote(value: &[u8], out: &mut [u8; MAX_KEY_LEN]) -> Result<usize, KeyError> {
    let mut len = 0;
    let mut bytes = value[1..].iter();
    loop {
        let c = match bytes.next() {
            None => return Err(KeyError::Invalid("the quoted key has no closing quote")),
            Some(b'\\') => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => c,
                _ => return Err(KeyError::Invalid("the quoted key has an invalid escape")),
            },
            Some(b'"') => break,
            Some(&c) => c,
        };
        let Some(slot) = out.get_mut(len) else {
            return Err(KeyError::Invalid("the key is longer than 255 characters"));
        };
        *slot = c;
        len += 1;
    }
    parameters(bytes.as_slice())?;
    Ok(len)
}

/// Checks what follows a quoted key: nothing, or Structured-Field parameters (`;name` or
/// `;name=value`, RFC 9651 §3.1.2), which an Item may carry and which are ignored, as the RFC
/// asks of parameters a recipient does not know. They are parsed by the RFC's rules all the
/// same: a field that does not parse is not a Structured Field, so its key is invalid. A comma
/// outside quotes means several header lines were combined.
fn parameters(mut rest: &[u8]) -> Result<(), KeyError> {
    const INVALID: KeyError = KeyError::Invalid("the quoted key is followed by other characters");
    const PARAMETER: KeyError =
        KeyError::Invalid("the quoted key has a parameter that is not a Structured-Field one");
    // Parameters follow the item at once, each `;` then spaces, a name, and `=` and a value.
    while let Some((b';', after)) = rest.split_first() {
        rest = skip_spaces(after);
        // The name: a lowercase letter or `*`, then lowercase letters, digits, `_`, `-`, `.`,
        // `*`.
        if !matches!(rest.first(), Some(b'a'..=b'z' | b'*')) {
            return Err(PARAMETER);
        }
        let name_len = rest
            .iter()
            .position(|b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'))
            .unwrap_or(rest.len());
        rest = &rest[name_len..];
        if let Some(value) = rest.strip_prefix(b"=") {
            rest = bare_item(value).ok_or(PARAMETER)?;
        } // A name alone is `true`.
    }
    match skip_spaces(rest).first() {
        None => Ok(()),
        Some(b',') => Err(KeyError::Invalid("the header was sent more than once")),
        Some(_) => Err(INVALID),
    }
}

/// `bytes` without its leading spaces (only spaces: RFC 9651 allows no other whitespace
/// between a field's parts).
fn skip_spaces(bytes: &[u8]) -> &[u8] {
    let at = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    &bytes[at..]
}

/// Parses a Structured-Field bare item at the start of `input` (RFC 9651 §4.2.3.1): an integer
/// or decimal, a string, a token, a byte sequence, a boolean, a date or a display string.
/// Returns what follows it, or `None` when `input` does not start with one.
fn bare_item(input: &[u8]) -> Option<&[u8]> {
    let (&first, after) = input.split_first()?;
    match first {
        b'-' | b'0'..=b'9' => number(input, true),
        b'"' => string(after),
        b'A'..=b'Z' | b'a'..=b'z' | b'*' => {
            let len = after
                .iter()
                .position(|&b| !(is_tchar(b) || b == b':' || b == b'/'))
                .unwrap_or(after.len());
            Some(&after[len..])
        }
        b':' => {
            let len = after.iter().position(|&b| b == b':')?;
            let base64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
            after[..len].iter().all(base64).then(|| &after[len + 1..])
        }
        b'?' => match after.split_first() {
            Some((b'0' | b'1', rest)) => Some(rest),
            _ => None,
        },
        b'@' => number(after, false),
        b'%' => display_string(after.strip_prefix(b"\"")?),
        _ => None,
    }
}

/// An integer (at most 15 digits) or, when `decimal`, a decimal (at most 12 digits, `.`, 1 to
/// 3 digits), with an optional `-`, at the start of `input`; what follows it.
fn number(input: &[u8], decimal: bool) -> Option<&[u8]> {
    let digits = input.strip_prefix(b"-").unwrap_or(input);
    let int_len = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let rest = &digits[int_len..];
    match rest.split_first() {
        Some((b'.', fraction)) if decimal => {
            let frac_len = fraction
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(fraction.len());
            ((1..=12).contains(&int_len) && (1..=3).contains(&frac_len))
                .then(|| &fraction[frac_len..])
        }
        _ => (1..=15).contains(&int_len).then_some(rest),
    }
}

/// A string's characters after its opening quote: visible ASCII and spaces, with `\"` and `\\`
/// escapes; what follows its closing quote.
fn string(input: &[u8]) -> Option<&[u8]> {
    let mut bytes = input.iter();
    loop {
        match bytes.next()? {
            b'"' => return Some(bytes.as_slice()),
            b'\\' => {
                if !matches!(bytes.next()?, b'"' | b'\\') {
                    return None;
                }
            }
            b' '..=b'~' => {}
            _ => return None,
        }
    }
}

/// A display string's characters after its `%"`: visible ASCII and spaces, with `%` and two
/// lowercase hex digits for each byte of what is not, which must spell UTF-8; what follows its
/// closing quote.
fn display_string(input: &[u8]) -> Option<&[u8]> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut decoded = Vec::new();
    let mut at = 0;
    loop {
        match *input.get(at)? {
            b'"' => break,
            b'%' => {
                let (high, low) = (hex(*input.get(at + 1)?)?, hex(*input.get(at + 2)?)?);
                decoded.push(high << 4 | low);
                at += 3;
            }
            b @ b' '..=b'~' => {
                decoded.push(b);
                at += 1;
            }
            _ => return None,
        }
    }
    std::str::from_utf8(&decoded).ok()?;
    Some(&input[at + 1..])
}

/// Whether `b` is a `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Whether every byte of `bytes` is visible ASCII (`!` to `~`) other than `,`: eight bytes at a
/// time, the last eight overlapping the word before them when the length is not a multiple
/// of eight.
fn visible_without_comma(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    // Each byte below 0x80 (so that no sum below carries into the next byte) and then: at
    // least `!` (0x21 + 0x5f sets the high bit), at most `~` (0x7f + 1 would set it), not `,`
    // (a byte that the xor leaves non-zero sets it with 0x7f).
    let word = |bytes: &[u8; 8]| {
        let w = u64::from_ne_bytes(*bytes);
        w & HIGH == 0
            && w.wrapping_add(ONES * 0x5f) & HIGH == HIGH
            && w.wrapping_add(ONES) & HIGH == 0
            && (w ^ (ONES * b',' as u64)).wrapping_add(ONES * 0x7f) & HIGH == HIGH
    };
    match bytes.last_chunk::<8>() {
        Some(last) => bytes.as_chunks::<8>().0.iter().all(word) && word(last),
        None => bytes.iter().all(|&b| matches!(b, b'!'..=b'~') && b != b','),
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
    fn structured_field_parameters_are_ignored() {
        assert_eq!(ok(b"\"abc\";x=1"), "abc");
        assert_eq!(ok(b"\"abc\"; x=1;y"), "abc");
        assert_eq!(
            ok(b"\"abc\";a=?1;b=tok/en;c=\"s;t,r\\\"\";d=:AQ==:;e=1.5"),
            "abc"
        );
        assert!(invalid(b"\"abc\";"));
        assert!(invalid(b"\"abc\";X=1"));
        assert!(invalid(b"\"abc\";1x=1"));
        assert!(invalid(b"\"abc\";x="));
        assert!(invalid(b"\"abc\";x=\"open"));
        assert!(invalid(b"\"abc\";x=1, \"def\""));
        assert!(invalid(b"\"abc\" x"));
        // Every kind of value RFC 9651 has.
        let values: [&[u8]; 14] = [
            b"0",
            b"-42",
            b"123456789012345",
            b"-123456789012.123",
            b"\"\"",
            b"\"a \\\\ b\"",
            b"*tok:en/x!#",
            b"::",
            b":cHJldGVuZCB0aGlzIGlzIGJpbmFyeQ==:",
            b"?0",
            b"@1659578233",
            b"@-1",
            b"%\"f%c3%bc%c3%bc\"",
            b"%\"\"",
        ];
        for value in values {
            let field = [&b"\"abc\";p="[..], value, b";q"].concat();
            assert_eq!(ok(&field), "abc", "{}", String::from_utf8_lossy(&field));
        }
        // A field that does not parse as a Structured Field is not one: its key is invalid,
        // though the parameters would be ignored.
        let malformed: [&[u8]; 22] = [
            b"\"abc\" ;p=1",
            b"\"abc\"\t;p=1",
            b"\"abc\";\tp=1",
            b"\"abc\";p =1",
            b"\"abc\";p= 1",
            b"\"abc\";p=1 ;q",
            b"\"abc\";p=\"\\x\"",
            b"\"abc\";p=a\"b",
            b"\"abc\";p=@",
            b"\"abc\";p=@1.5",
            b"\"abc\";p=1.2.3",
            b"\"abc\";p=1234567890123456",
            b"\"abc\";p=1234567890123.1",
            b"\"abc\";p=1.1234",
            b"\"abc\";p=1.",
            b"\"abc\";p=-",
            b"\"abc\";p=?2",
            b"\"abc\";p=:a b:",
            b"\"abc\";p=:AQ==",
            b"\"abc\";p=%\"%C3%BC\"",
            b"\"abc\";p=%\"%c3\"",
            b"\"abc\";p=\"\xc3\xa9\"",
        ];
        for field in malformed {
            assert!(invalid(field), "{}", String::from_utf8_lossy(field));
        }
        // A bare key keeps its characters: `;` is one of them.
        assert_eq!(ok(b"abc;x=1"), "abc;x=1");
    }

    /// The header is found once, missing, or sent twice, among a few fields or many, and
    /// whatever other fields share the map.
    #[test]
    fn the_header_among_few_fields_and_many() {
        let name = HeaderName::from_static("idempotency-key");
        for others in [0, 5, crate::util::FEW_FIELDS, 40] {
            let mut headers = crate::util::other_fields(others);
            assert!(matches!(parse(&headers, &name), Err(KeyError::Missing)));
            headers.append(&name, HeaderValue::from_static("k1"));
            let parsed = parse(&headers, &name).unwrap();
            assert_eq!(
                (parsed.key.as_str(), parsed.raw.as_bytes()),
                ("k1", &b"k1"[..])
            );
            headers.append(&name, HeaderValue::from_static("k2"));
            assert!(
                matches!(parse(&headers, &name), Err(KeyError::Invalid(_))),
                "sent twice among {others}"
            );
        }
    }

    /// Eight bytes at a time, every byte value in every place of every length up to 40 is
    /// told as one at a time would tell it.
    #[test]
    fn visible_without_comma_byte_by_byte() {
        let one = |b: u8| matches!(b, b'!'..=b'~') && b != b',';
        for len in 0..40 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut bytes = vec![b'k'; len];
                    bytes[at] = byte;
                    assert_eq!(
                        visible_without_comma(&bytes),
                        one(byte),
                        "{byte:#x} at {at} of {len}"
                    );
                }
            }
        }
    }

    /// A value the shortcut does not take gets the error it always got.
    #[test]
    fn errors_after_the_shortcut() {
        let error = |value: &[u8]| match parse_value(value) {
            Err(KeyError::Invalid(why)) => why,
            other => panic!("{value:?}: {other:?}"),
        };
        assert_eq!(error(b"a,b"), "the header was sent more than once");
        assert_eq!(error(b"a, b c"), "the header was sent more than once");
        assert_eq!(error(b"  "), "the key is empty");
        assert_eq!(error(&[b'k'; 256]), "the key is longer than 255 characters");
        assert_eq!(
            error(b"abcdefgh\x7fij"),
            "the key must be visible ASCII characters without spaces"
        );
        assert_eq!(error(b"\"ab"), "the quoted key has no closing quote");
    }

    #[test]
    fn combined_values_count_as_repeated() {
        assert!(invalid(b"a, b"));
        assert!(invalid(b"a,b"));
        assert!(invalid(b"\"a\", \"b\""));
        assert_eq!(ok(b"\"a,b\""), "a,b");
    }

    /// Keys up to 46 characters are kept inline, longer ones shared: either way the same text,
    /// equal and hashed alike however they were made.
    #[test]
    fn key_text_inline_and_shared() {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        for len in [1, 36, INLINE, INLINE + 1, MAX_KEY_LEN] {
            let key = "k".repeat(len);
            let parsed = parse_value(key.as_bytes()).unwrap();
            assert_eq!(parsed.as_str(), key);
            assert_eq!(parsed.as_bytes(), key.as_bytes());
            assert_eq!(matches!(parsed.0, Repr::Inline { .. }), len <= INLINE);
            let shared = KeyText::from_shared(Arc::from(key.as_str()));
            assert_eq!(parsed, shared);
            assert_eq!(hasher.hash_one(&parsed), hasher.hash_one(&shared));
            assert_eq!(hasher.hash_one(&parsed), hasher.hash_one(key.as_str()));
            let record = RecordKey::new(TenantId::shared(), key.as_str());
            assert_eq!(record.key(), key);
            assert_eq!(record, RecordKey::from_text(TenantId::shared(), parsed));
        }
        let quoted = format!("\"{}\\\"\"", "q".repeat(INLINE - 1));
        assert_eq!(
            parse_value(quoted.as_bytes()).unwrap().as_str(),
            format!("{}\"", "q".repeat(INLINE - 1))
        );
    }

    #[test]
    fn header_map() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(parse(&headers, &name).unwrap_err(), KeyError::Missing);
        headers.insert(&name, HeaderValue::from_static("\"k1\""));
        let parsed = parse(&headers, &name).unwrap();
        assert_eq!(parsed.key.as_str(), "k1");
        assert_eq!(parsed.raw, "\"k1\"");
        headers.append(&name, HeaderValue::from_static("k2"));
        assert!(matches!(parse(&headers, &name), Err(KeyError::Invalid(_))));
    }
}
