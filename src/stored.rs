//! Stored responses: what a completed record keeps, how it is replayed, and how shared stores
//! encode it.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use bytes::{Buf, BufMut, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, response};

/// A response kept by a completed record, replayed to every retry.
///
/// Cloning is cheap: one reference count (the first clone allocates it).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse(Stored);

/// The response in one buffer, in the form [`StoredResponse::encode`] writes: status, each stored
/// header's name and value, its trailers' when it has any, and the body. It is built once from the
/// handler's response and read as is: a replay slices its header values and body out of it, a
/// shared store writes it, the memory store counts it. The map [`StoredResponse::headers`] returns
/// and the body [`StoredResponse::body`] returns are made on the first call of either (the flow
/// calls neither), in one allocation that a record without them does not carry, and that a clone
/// does not share.
struct Stored {
    status: StatusCode,
    body_omitted: bool,
    /// The encoded response: written by [`pack`], or checked whole by
    /// [`StoredResponse::decode`].
    packed: Bytes,
    /// At most [`MAX_HEADER_CAPACITY`].
    header_count: u16,
    /// Whether trailer fields follow the headers (a `bool` and a count rather than an
    /// `Option<u16>`, which would not fit beside the other small fields in one word).
    has_trailers: bool,
    /// The trailer fields, at most [`MAX_HEADER_CAPACITY`].
    trailer_fields: u16,
    /// Where the body starts in `packed`.
    body_at: usize,
    views: OnceLock<Box<Views>>,
}

/// What the accessors of a [`StoredResponse`] return by reference.
struct Views {
    map: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// The bytes before the first header: format version, flags, status, header count.
const HEAD_LEN: usize = 8;

/// The flags byte: the body was too large to store.
const OMITTED: u8 = 1;
/// The flags byte: trailer fields follow the headers, after their count (4 bytes).
const TRAILERS: u8 = 2;

/// Encodes a response: the headers `headers()` yields that are `kept`, the trailers when there
/// are any, and a copy of `body`. The buffer is allocated once, at the size of every header
/// `headers()` yields (asked twice: measured, then written): `kept` is asked once per header,
/// as it is written, and when it leaves one out (rare: hop-by-hop headers, `Date`, a skipped
/// name), the buffer is shrunk to what was written.
fn pack<'a, I>(
    status: StatusCode,
    body_omitted: bool,
    headers: impl Fn() -> I,
    kept: impl Fn(&HeaderName) -> bool,
    trailers: Option<&HeaderMap>,
    body: &[u8],
) -> Stored
where
    I: Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
{
    let (_, header_bytes) = measure(headers());
    // A map holds no more than this: a `HeaderMap` given to `new` could not either.
    let headers = || {
        headers()
            .filter(|(name, _)| kept(name))
            .take(MAX_HEADER_CAPACITY)
    };
    let trailers = trailers.filter(|t| !t.is_empty());
    let trailer_fields = || trailers.into_iter().flatten().take(MAX_HEADER_CAPACITY);
    let (trailer_count, trailer_bytes) = measure(trailer_fields());
    let trailer_bytes = trailer_bytes + if trailers.is_some() { 4 } else { 0 };
    let mut out = Vec::with_capacity(HEAD_LEN + header_bytes + trailer_bytes + 8 + body.len());
    let flags = u8::from(body_omitted) * OMITTED + u8::from(trailers.is_some()) * TRAILERS;
    out.put_u8(FORMAT_VERSION);
    out.put_u8(flags);
    out.put_u16(status.as_u16());
    // The count, written once the headers are.
    out.put_u32(0);
    let mut count = 0;
    for field in headers() {
        put_field(&mut out, field);
        count += 1;
    }
    out[4..HEAD_LEN].copy_from_slice(&(count as u32).to_be_bytes());
    if trailers.is_some() {
        out.put_u32(trailer_count as u32);
        for field in trailer_fields() {
            put_field(&mut out, field);
        }
    }
    out.put_u64(body.len() as u64);
    let body_at = out.len();
    out.put_slice(body);
    // At its capacity, so that the `Vec` becomes a `Bytes` without a copy.
    out.shrink_to_fit();
    Stored {
        status,
        body_omitted,
        packed: Bytes::from(out),
        header_count: count as u16,
        has_trailers: trailers.is_some(),
        trailer_fields: trailer_count as u16,
        body_at,
        views: OnceLock::new(),
    }
}

/// How many fields `fields` yields, and the bytes they take encoded.
fn measure<'a>(fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> (usize, usize) {
    fields.fold((0, 0), |(count, bytes), (name, value)| {
        (count + 1, bytes + 8 + name.as_str().len() + value.len())
    })
}

/// Writes a header's name and value, each after its length.
#[inline(always)]
fn put_field(out: &mut Vec<u8>, (name, value): (&HeaderName, &HeaderValue)) {
    out.put_u32(name.as_str().len() as u32);
    out.put_slice(name.as_str().as_bytes());
    out.put_u32(value.len() as u32);
    out.put_slice(value.as_bytes());
}

impl Stored {
    /// How many trailer fields follow the headers; `None` for a response without trailers.
    fn trailer_count(&self) -> Option<u16> {
        self.has_trailers.then_some(self.trailer_fields)
    }

    /// The stored headers as (name, value) bytes, in the order they were stored.
    fn pairs(&self) -> Pairs<'_> {
        Pairs {
            rest: &self.packed[HEAD_LEN..self.body_at - 8],
            left: usize::from(self.header_count),
        }
    }

    /// The stored trailers as (name, value) bytes, in the order they were stored: after the
    /// headers and the trailers' count.
    fn trailer_pairs(&self) -> Pairs<'_> {
        let mut headers = self.pairs();
        headers.by_ref().for_each(drop);
        let count = self.trailer_count().unwrap_or(0);
        Pairs {
            rest: headers.rest.get(4..).unwrap_or_default(),
            left: usize::from(count),
        }
    }

    /// The buffer that the values of the fields handed out share: `packed` itself when its
    /// body is small, else a copy of what precedes the body. A field's value may be held long
    /// after its response was sent (an HTTP/2 connection's header compression table keeps the
    /// fields it indexes for the connection's life; a log or a cache may keep one), and a value
    /// that shares `packed` keeps all of it: the body too, after the store dropped the record.
    /// With a copy, a value held keeps the header section alone, which is small and bounded.
    fn field_source(&self) -> Cow<'_, Bytes> {
        if self.packed.len() - self.body_at <= SHARED_BODY_MAX {
            Cow::Borrowed(&self.packed)
        } else {
            Cow::Owned(Bytes::copy_from_slice(&self.packed[..self.body_at]))
        }
    }

    /// The stored headers as a name and a value that shares `source` (see
    /// [`field_source`](Self::field_source)).
    fn headers<'a>(
        &'a self,
        source: &'a Bytes,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> + 'a {
        self.fields(source, self.pairs())
    }

    /// The stored trailers, or `None` for a response without trailers; their values share
    /// `source`.
    fn trailers(&self, source: &Bytes) -> Option<HeaderMap> {
        let count = self.trailer_count()?;
        Some(to_map(
            self.fields(source, self.trailer_pairs()),
            count.into(),
            0,
        ))
    }

    /// Fields as a name and a value that shares `source`: `packed`, or a copy of its start that
    /// holds every field (see [`field_source`](Self::field_source)).
    fn fields<'a>(
        &'a self,
        source: &'a Bytes,
        pairs: Pairs<'a>,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> + 'a {
        pairs.filter_map(move |(name, value)| {
            // Both were checked when the response was stored or decoded.
            let name = stored_name(name)?;
            // `value` lies in `packed`, before the body, so at the same offset in `source`:
            // sliced there, without `slice_ref`'s checks.
            let at = value.as_ptr() as usize - self.packed.as_ptr() as usize;
            let value = source.slice(at..at + value.len());
            let value = HeaderValue::from_maybe_shared(value).ok()?;
            Some((name, value))
        })
    }

    fn body(&self) -> &[u8] {
        &self.packed[self.body_at..]
    }

    fn views(&self) -> &Views {
        self.views.get_or_init(|| {
            let source = self.field_source();
            Box::new(Views {
                map: to_map(self.headers(&source), self.header_count.into(), 0),
                body: self.packed.slice(self.body_at..),
                trailers: self.trailers(&source),
            })
        })
    }
}

/// The name a stored header's `bytes` spell: checked when the response was stored or
/// decoded, so lowercase and valid. The names responses commonly carry are matched here, without
/// the lowercased copy `HeaderName::from_bytes` makes of every name nor, for the non-standard
/// ones, the allocation it makes for each; any other name is parsed.
fn stored_name(bytes: &[u8]) -> Option<HeaderName> {
    known_name(bytes).or_else(|| HeaderName::from_bytes(bytes).ok())
}

/// `known_name`: the names matched without parsing, each the name that parsing its text gives
/// (the standard ones are `http`'s constants, the others are built at compile time).
macro_rules! known_names {
    ($($text:literal => $name:expr,)*) => {
        fn known_name(bytes: &[u8]) -> Option<HeaderName> {
            match bytes {
                $($text => Some($name),)*
                _ => None,
            }
        }

        #[cfg(test)]
        const KNOWN_NAMES: &[&[u8]] = &[$($text),*];
    };
}

known_names! {
    b"content-type" => header::CONTENT_TYPE,
    b"content-length" => header::CONTENT_LENGTH,
    b"location" => header::LOCATION,
    b"set-cookie" => header::SET_COOKIE,
    b"cache-control" => header::CACHE_CONTROL,
    b"etag" => header::ETAG,
    b"last-modified" => header::LAST_MODIFIED,
    b"expires" => header::EXPIRES,
    b"vary" => header::VARY,
    b"link" => header::LINK,
    b"content-encoding" => header::CONTENT_ENCODING,
    b"content-language" => header::CONTENT_LANGUAGE,
    b"content-location" => header::CONTENT_LOCATION,
    b"content-disposition" => header::CONTENT_DISPOSITION,
    b"content-security-policy" => header::CONTENT_SECURITY_POLICY,
    b"retry-after" => header::RETRY_AFTER,
    b"www-authenticate" => header::WWW_AUTHENTICATE,
    b"access-control-allow-origin" => header::ACCESS_CONTROL_ALLOW_ORIGIN,
    b"access-control-allow-credentials" => header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    b"access-control-expose-headers" => header::ACCESS_CONTROL_EXPOSE_HEADERS,
    b"strict-transport-security" => header::STRICT_TRANSPORT_SECURITY,
    b"x-content-type-options" => header::X_CONTENT_TYPE_OPTIONS,
    b"x-frame-options" => header::X_FRAME_OPTIONS,
    b"referrer-policy" => header::REFERRER_POLICY,
    b"server" => header::SERVER,
    b"trailer" => header::TRAILER,
    b"x-request-id" => const { HeaderName::from_static("x-request-id") },
    b"request-id" => const { HeaderName::from_static("request-id") },
}

/// The headers of an encoded response, as (name, value) bytes.
struct Pairs<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        let name = take_field(&mut self.rest).ok()?;
        let value = take_field(&mut self.rest).ok()?;
        Some((name, value))
    }
}

/// Equal as responses: same status, body and headers (compared as maps, as `HeaderMap` does).
impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status
            && self.body_omitted == other.body_omitted
            && self.body() == other.body()
            && self.has_trailers == other.has_trailers
            && (self.packed == other.packed
                || (self.views().map == other.views().map
                    && self.views().trailers == other.views().trailers))
    }
}

impl Eq for Stored {}

impl Clone for Stored {
    fn clone(&self) -> Self {
        Self {
            status: self.status,
            body_omitted: self.body_omitted,
            packed: self.packed.clone(),
            header_count: self.header_count,
            has_trailers: self.has_trailers,
            trailer_fields: self.trailer_fields,
            body_at: self.body_at,
            views: OnceLock::new(),
        }
    }
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stored = &self.0;
        f.debug_struct("StoredResponse")
            .field("status", &stored.status)
            .field("headers", &DebugHeaders(stored))
            .field("body", self.body())
            .field("trailers", &self.trailers())
            .field("body_omitted", &stored.body_omitted)
            .finish()
    }
}

struct DebugHeaders<'a>(&'a Stored);

impl fmt::Debug for DebugHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.headers(&self.0.packed))
            .finish()
    }
}

/// The largest body beside which the values of a record's fields share its buffer (see
/// `Stored::field_source`): a value held then keeps at most this much besides the header section.
const SHARED_BODY_MAX: usize = 1024;

/// The most entries a capacity is asked for: `HeaderMap` refuses larger ones (its table is
/// at most 32,768 slots, and it keeps a quarter of them free). A stored response holds no
/// more headers than this.
const MAX_HEADER_CAPACITY: usize = 24_576;

/// A map of `count` headers with room for `extra` more, without growing. A map cannot hold
/// more than 32,768 entries: past that, the rest are left out rather than panicking.
fn to_map(
    headers: impl Iterator<Item = (HeaderName, HeaderValue)>,
    count: usize,
    extra: usize,
) -> HeaderMap {
    let mut map = HeaderMap::new();
    fill(&mut map, headers, count, extra);
    map
}

/// Appends `count` headers to the empty `map`, first sized for them and `extra` more (one
/// allocation of its table, as [`HeaderMap::with_capacity`] makes). Past what a map can hold,
/// the rest are left out rather than panicking.
fn fill(
    map: &mut HeaderMap,
    headers: impl Iterator<Item = (HeaderName, HeaderValue)>,
    count: usize,
    extra: usize,
) {
    // Within what a map can hold, so that the reservation cannot fail.
    let _ = map.try_reserve((count + extra).min(MAX_HEADER_CAPACITY));
    for (name, value) in headers {
        if map.try_append(name, value).is_err() {
            break;
        }
    }
}

/// Whether a header named `name` is never stored: a hop-by-hop header (RFC 9110 §7.6.1;
/// besides, those the response's `Connection` names) or `Date`, which belongs to the moment a
/// response is sent. `Trailer`, which announces the trailer fields a body ends with, is stored
/// with them. One match on the name's text: most names differ from each of these in length.
fn never_stored(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "date"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Whether the `Connection` headers `connection` name `name` (a comma-separated list of
/// header names, any case), which makes it a hop-by-hop header of that response.
fn named_by(connection: &http::header::GetAll<'_, HeaderValue>, name: &HeaderName) -> bool {
    connection.iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|token| {
            token
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
}

impl StoredResponse {
    /// A stored response with `status`, `headers` and `body`.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self(pack(
            status,
            false,
            || headers.iter(),
            |_| true,
            None,
            &body,
        ))
    }

    /// This response with `trailers` after its body (replacing any it had); an empty map means
    /// no trailers.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, StatusCode};
    /// use tower_idempotency::StoredResponse;
    ///
    /// let mut trailers = HeaderMap::new();
    /// trailers.insert("grpc-status", "0".parse().unwrap());
    /// let stored = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"hi"))
    ///     .with_trailers(trailers.clone());
    /// assert_eq!(stored.trailers(), Some(&trailers));
    /// assert_eq!(StoredResponse::decode(&stored.encode()).unwrap(), stored);
    /// ```
    pub fn with_trailers(self, trailers: HeaderMap) -> Self {
        let stored = &self.0;
        let headers: Vec<_> = stored.headers(&stored.packed).collect();
        let headers = || headers.iter().map(|(name, value)| (name, value));
        let status = stored.status;
        Self(pack(
            status,
            stored.body_omitted,
            headers,
            |_| true,
            Some(&trailers),
            stored.body(),
        ))
    }

    /// A record of a response whose body was too large to store: it completed with `status`,
    /// but cannot be replayed.
    pub fn omitted(status: StatusCode) -> Self {
        Self(pack(status, true, std::iter::empty, |_| true, None, &[]))
    }

    /// The status code of the original response.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The stored headers of the original response.
    pub fn headers(&self) -> &HeaderMap {
        &self.0.views().map
    }

    /// The body of the original response.
    pub fn body(&self) -> &Bytes {
        &self.0.views().body
    }

    /// The trailers that followed the original response's body, or `None` when it had none.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.0.views().trailers.as_ref()
    }

    /// `true` when the original response was too large to store, so it cannot be replayed.
    pub fn is_omitted(&self) -> bool {
        self.0.body_omitted
    }

    /// The estimated bytes of what this response keeps: its body, and each stored header's
    /// name and value plus `per_header` for its own overhead. The stores that bound their
    /// memory (the memory store, the replay cache) count records by it.
    pub(crate) fn payload_size(&self, per_header: usize) -> usize {
        let stored = &self.0;
        let trailers = stored.trailer_count().map(usize::from);
        let count = usize::from(stored.header_count) + trailers.unwrap_or(0);
        // Between the head and the body's length, each header and trailer is its name and
        // value and their two 4-byte lengths, and the trailers' count when there are trailers,
        // and nothing else (`pack` writes it so, `decode` checks it).
        let trailer_count_len = if trailers.is_some() { 4 } else { 0 };
        let names_and_values = stored.body_at - 8 - HEAD_LEN - 8 * count - trailer_count_len;
        count * per_header + names_and_values + stored.body().len()
    }

    /// Builds the stored form of a handler's response head, a copy of its body and its
    /// trailers, leaving out hop-by-hop headers, `Date`, the echoed key header, the headers in
    /// `skip`, and `Set-Cookie` when `skip_cookies`.
    pub(crate) fn from_parts(
        parts: &response::Parts,
        body: &[u8],
        trailers: Option<&HeaderMap>,
        key_header: &HeaderName,
        skip: &[HeaderName],
        skip_cookies: bool,
    ) -> Self {
        // Most responses have no `Connection` header: then no header is looked up in it.
        let connection = crate::util::has_header(&parts.headers, &header::CONNECTION)
            .then(|| parts.headers.get_all(header::CONNECTION));
        let kept = |name: &HeaderName| {
            !(never_stored(name)
                || name == key_header
                || skip.contains(name)
                || (skip_cookies && name == http::header::SET_COOKIE)
                || connection.as_ref().is_some_and(|c| named_by(c, name)))
        };
        let headers = || parts.headers.iter();
        // Trailer fields go through the same filter: a field the app keeps out of the record
        // stays out whether it comes before the body or after it. (Rare: copied into a map of
        // their own; none kept, no trailers stored.)
        let trailers: Option<HeaderMap> = trailers.map(|trailers| {
            let kept = trailers.iter().filter(|(name, _)| kept(name));
            kept.map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        });
        Self(pack(
            parts.status,
            false,
            headers,
            kept,
            trailers.as_ref(),
            body,
        ))
    }

    /// The replayed response: status and headers as stored, with room in the header map for
    /// `extra` more headers, and the body `body` makes of the stored body and trailers (sharing
    /// the record's buffer, not copied). Built where it is returned: the headers go straight
    /// into the response's own map, which is neither moved nor replaced.
    pub(crate) fn into_replay<B>(
        self,
        extra: usize,
        body: impl FnOnce(Bytes, Option<HeaderMap>) -> B,
    ) -> http::Response<B> {
        let stored = &self.0;
        let data = stored.packed.slice(stored.body_at..);
        let source = stored.field_source();
        let mut response = http::Response::new(body(data, stored.trailers(&source)));
        *response.status_mut() = stored.status;
        let count = stored.header_count.into();
        fill(
            response.headers_mut(),
            stored.headers(&source),
            count,
            extra,
        );
        response
    }

    /// Encodes the response for a store that keeps bytes: the buffer it is kept in, shared,
    /// not copied. The format is versioned and self-delimiting; [`decode`](Self::decode) reads
    /// it back.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, StatusCode};
    /// use tower_idempotency::StoredResponse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.append("set-cookie", "a=1".parse().unwrap());
    /// headers.append("set-cookie", "b=2".parse().unwrap());
    /// let stored = StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(b"{}"));
    /// assert_eq!(StoredResponse::decode(&stored.encode()).unwrap(), stored);
    /// ```
    pub fn encode(&self) -> Bytes {
        self.0.packed.clone()
    }

    /// Decodes what [`encode`](Self::encode) wrote, checking every field, into one copy of
    /// `input`. Never panics and never allocates more than the input's length on any input.
    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let buf = &mut &input[..];
        if take_u8(buf)? != FORMAT_VERSION {
            return Err(DecodeError("unknown format version"));
        }
        let flags = take_u8(buf)?;
        if flags & !(OMITTED | TRAILERS) != 0 {
            return Err(DecodeError("invalid flags"));
        }
        let body_omitted = flags & OMITTED != 0;
        let status =
            StatusCode::from_u16(take_u16(buf)?).map_err(|_| DecodeError("invalid status code"))?;
        let header_count = take_fields(buf)?;
        let has_trailers = flags & TRAILERS != 0;
        let trailer_fields = if has_trailers {
            take_fields(buf)? as u16
        } else {
            0
        };
        if has_trailers && trailer_fields == 0 {
            // `encode` writes no trailers section for a response without trailer fields.
            return Err(DecodeError("empty trailers"));
        }
        let len = usize::try_from(take_u64(buf)?).map_err(|_| DecodeError("body too long"))?;
        let body = take(buf, len)?;
        if !buf.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Self(Stored {
            status,
            body_omitted,
            packed: Bytes::copy_from_slice(input),
            header_count: header_count as u16,
            has_trailers,
            trailer_fields,
            body_at: input.len() - body.len(),
            views: OnceLock::new(),
        }))
    }
}

/// Reads and checks a count of header fields (at most [`MAX_HEADER_CAPACITY`]) and the fields
/// that follow it; returns the count.
fn take_fields(buf: &mut &[u8]) -> Result<usize, DecodeError> {
    let count = take_u32(buf)? as usize;
    if count > MAX_HEADER_CAPACITY {
        return Err(DecodeError("too many headers"));
    }
    for _ in 0..count {
        // A name matched without parsing is valid; another is parsed (which allocates a
        // non-standard one).
        let name = take_field(buf)?;
        if known_name(name).is_none() && HeaderName::from_bytes(name).is_err() {
            return Err(DecodeError("invalid header name"));
        }
        if !take_field(buf)?.iter().all(|&b| is_value_byte(b)) {
            return Err(DecodeError("invalid header value"));
        }
    }
    Ok(count)
}

/// A byte `HeaderValue::from_bytes` accepts: visible ASCII, space, tab and obs-text.
fn is_value_byte(b: u8) -> bool {
    (b >= 32 && b != 127) || b == b'\t'
}

const FORMAT_VERSION: u8 = 1;

/// A stored response could not be decoded: the bytes are not what
/// [`StoredResponse::encode`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid stored response: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn take<'a>(buf: &mut &'a [u8], len: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < len {
        return Err(DecodeError("truncated"));
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Ok(head)
}

/// A length-prefixed field: a header's name or value.
fn take_field<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let len = take_u32(buf)? as usize;
    take(buf, len)
}

fn take_u8(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    Ok(take(buf, 1)?.get_u8())
}

fn take_u16(buf: &mut &[u8]) -> Result<u16, DecodeError> {
    Ok(take(buf, 2)?.get_u16())
}

fn take_u32(buf: &mut &[u8]) -> Result<u32, DecodeError> {
    Ok(take(buf, 4)?.get_u32())
}

fn take_u64(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    Ok(take(buf, 8)?.get_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, "/payments/1".parse().unwrap());
        headers.append(header::SET_COOKIE, "a=1".parse().unwrap());
        headers.append(header::SET_COOKIE, "b=2".parse().unwrap());
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(b"\x00\xffbody"),
        )
    }

    /// A header value handed out may be held long after its response (an HTTP/2 connection's
    /// header table, a log): beside a large body, it shares a copy of the header section, not
    /// the record's buffer, so that holding it does not keep the body; beside a small one, the
    /// buffer itself (no copy, no allocation). Headers and trailers alike, replayed or read.
    #[test]
    fn held_values_keep_the_body_only_when_it_is_small() {
        let within = |value: &HeaderValue, stored: &StoredResponse| {
            let buffer = stored.0.packed.as_ptr_range();
            buffer.contains(&value.as_bytes().as_ptr())
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        for (len, shared) in [
            (0, true),
            (SHARED_BODY_MAX, true),
            (SHARED_BODY_MAX + 1, false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-request-id", "req_1".parse().unwrap());
            let body = Bytes::from(vec![7; len]);
            let stored = StoredResponse::new(StatusCode::CREATED, headers, body.clone())
                .with_trailers(trailers.clone());
            for stored in [
                stored.clone(),
                StoredResponse::decode(&stored.encode()).unwrap(),
            ] {
                let read = &stored.headers()["x-request-id"];
                assert_eq!(within(read, &stored), shared, "{len}");
                let trailer = &stored.trailers().unwrap()["grpc-status"];
                assert_eq!(within(trailer, &stored), shared, "{len}");
                let replay = stored
                    .clone()
                    .into_replay(0, |body, trailers| (body, trailers));
                let value = &replay.headers()["x-request-id"];
                assert_eq!(value, "req_1");
                assert_eq!(within(value, &stored), shared, "{len}");
                let (replayed_body, replayed_trailers) = replay.body();
                assert_eq!(replayed_body, &body);
                let trailer = &replayed_trailers.as_ref().unwrap()["grpc-status"];
                assert_eq!(trailer, "0");
                assert_eq!(within(trailer, &stored), shared, "{len}");
            }
        }
    }

    #[test]
    fn round_trip() {
        let stored = sample();
        assert_eq!(StoredResponse::decode(&stored.encode()).unwrap(), stored);
        let omitted = StoredResponse::omitted(StatusCode::OK);
        let back = StoredResponse::decode(&omitted.encode()).unwrap();
        assert!(back.is_omitted());
        assert_eq!(back.status(), StatusCode::OK);
    }

    /// Trailers are stored after the headers, read back, replayed, and counted; a response
    /// without them is stored as before (the same bytes).
    #[test]
    fn trailers_round_trip() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.append("x-checksum", "abc".parse().unwrap());
        let plain = sample();
        let with = plain.clone().with_trailers(trailers.clone());
        assert_eq!(with.trailers(), Some(&trailers));
        assert_eq!(with.headers(), plain.headers());
        assert_eq!(with.body(), plain.body());
        assert_ne!(with, plain);
        assert_eq!(plain.trailers(), None);
        assert_eq!(plain.clone().with_trailers(HeaderMap::new()), plain);
        let back = StoredResponse::decode(&with.encode()).unwrap();
        assert_eq!(back, with);
        assert_eq!(back.trailers(), Some(&trailers));
        let replay = back.into_replay(2, |body, trailers| (body, trailers));
        assert_eq!(replay.headers(), plain.headers());
        assert_eq!(&replay.body().0, plain.body());
        assert_eq!(replay.body().1, Some(trailers));
        // Counted as headers are: each field's name and value, and its overhead.
        let extra = "grpc-status".len() + 1 + "x-checksum".len() + 3;
        assert_eq!(
            with.payload_size(32),
            plain.payload_size(32) + extra + 2 * 32
        );
        for len in 0..with.encode().len() {
            assert!(
                StoredResponse::decode(&with.encode()[..len]).is_err(),
                "len {len}"
            );
        }
        let mut flags = with.encode().to_vec();
        flags[1] = 4;
        assert!(StoredResponse::decode(&flags).is_err());
        // A trailers section without fields is not what `encode` writes.
        let mut empty = plain.encode().to_vec();
        empty[1] |= TRAILERS;
        let body_len_at = plain.0.body_at - 8;
        empty.splice(body_len_at..body_len_at, 0u32.to_be_bytes());
        assert_eq!(
            StoredResponse::decode(&empty),
            Err(DecodeError("empty trailers"))
        );
    }

    /// Trailer fields go through the filters headers go through: skipped names, hop-by-hop
    /// ones, the key header and, when asked, `Set-Cookie`; none left, no trailers stored.
    #[test]
    fn from_parts_filters_trailers_as_headers() {
        let mut response = http::Response::new(());
        response
            .headers_mut()
            .insert(header::CONNECTION, "x-hop".parse().unwrap());
        let (parts, ()) = response.into_parts();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-secret", "s".parse().unwrap());
        trailers.insert("x-hop", "h".parse().unwrap());
        trailers.insert("idempotency-key", "k".parse().unwrap());
        trailers.append(header::SET_COOKIE, "sid=abc".parse().unwrap());
        trailers.insert("grpc-status", "0".parse().unwrap());
        let key = HeaderName::from_static("idempotency-key");
        let skip = [HeaderName::from_static("x-secret")];
        let stored = StoredResponse::from_parts(&parts, b"", Some(&trailers), &key, &skip, true);
        let kept: Vec<_> = stored
            .trailers()
            .unwrap()
            .keys()
            .map(|n| n.as_str())
            .collect();
        assert_eq!(kept, ["grpc-status"]);
        trailers.remove("grpc-status");
        let stored = StoredResponse::from_parts(&parts, b"", Some(&trailers), &key, &skip, true);
        assert_eq!(stored.trailers(), None);
    }

    /// A name matched without parsing is the name parsing gives: same text, same standard
    /// header or not, same hash in a map; a name not matched is parsed.
    #[test]
    fn known_names_are_the_parsed_names() {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        for &text in KNOWN_NAMES {
            let parsed = HeaderName::from_bytes(text).unwrap();
            let known = known_name(text).unwrap();
            assert_eq!(known, parsed);
            assert_eq!(known.as_str().as_bytes(), text);
            assert_eq!(hasher.hash_one(&known), hasher.hash_one(&parsed));
            let mut map = HeaderMap::new();
            map.append(parsed, HeaderValue::from_static("1"));
            assert!(map.contains_key(&known));
        }
        assert_eq!(known_name(b"x-custom"), None);
        let custom = stored_name(b"x-custom").unwrap();
        assert_eq!(custom, HeaderName::from_static("x-custom"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(StoredResponse::decode(&bytes[..len]).is_err(), "len {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(StoredResponse::decode(&longer).is_err());
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = vec![FORMAT_VERSION, 0, 0, 200];
        bytes.extend(u32::MAX.to_be_bytes());
        assert!(StoredResponse::decode(&bytes).is_err());
    }

    /// A record with more headers than a `HeaderMap` can take, as a store could hold it: an
    /// error, never a panic.
    fn many_headers(count: u32) -> Vec<u8> {
        let mut bytes = vec![FORMAT_VERSION, 0, 0, 200];
        bytes.extend(count.to_be_bytes());
        for _ in 0..count {
            bytes.extend(1u32.to_be_bytes());
            bytes.push(b'x');
            bytes.extend(1u32.to_be_bytes());
            bytes.push(b'v');
        }
        bytes.extend(0u64.to_be_bytes());
        bytes
    }

    #[test]
    fn too_many_headers_are_an_error_not_a_panic() {
        for count in [24_576, 24_577, 32_768, 32_769, 40_000, 70_000] {
            // Decoded or refused, and replayed without a panic.
            if let Ok(stored) = StoredResponse::decode(&many_headers(count)) {
                let replay = stored.into_replay(2, |body, _| body);
                assert!(!replay.headers().is_empty(), "{count}");
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        use std::hash::{BuildHasher, Hasher};
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let samples = [sample().encode(), sample().with_trailers(trailers).encode()];
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        for round in 0..40_000u32 {
            seed.write_u32(round);
            let r = seed.finish();
            let mut bytes = samples[round as usize % 2].to_vec();
            // Flip a few bytes, and cut or extend the input.
            for i in 0..(r % 4) {
                let at = ((r >> (8 * i)) as usize) % bytes.len();
                bytes[at] ^= (r >> 32) as u8 | 1;
            }
            bytes.truncate(((r >> 40) as usize) % (bytes.len() + 1));
            let _ = StoredResponse::decode(&bytes);
        }
    }

    #[test]
    fn payload_size_counts_each_header_s_name_and_value_and_the_body() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.append(header::SET_COOKIE, "a=1".parse().unwrap());
        headers.append(header::SET_COOKIE, "b=22".parse().unwrap());
        headers.insert("x-empty", HeaderValue::from_static(""));
        let body = Bytes::from_static(b"{\"id\":1}");
        let by_hand = [
            ("content-type", 16),
            ("set-cookie", 3),
            ("set-cookie", 4),
            ("x-empty", 0),
        ]
        .iter()
        .map(|(name, value)| 32 + name.len() + value)
        .sum::<usize>()
            + body.len();
        let stored = StoredResponse::new(StatusCode::CREATED, headers, body);
        assert_eq!(stored.payload_size(32), by_hand);
        let decoded = StoredResponse::decode(&stored.encode()).unwrap();
        assert_eq!(decoded.payload_size(32), by_hand);
        assert_eq!(StoredResponse::omitted(StatusCode::OK).payload_size(32), 0);
        let bare = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
        assert_eq!(bare.payload_size(32), 0);
    }

    #[test]
    fn from_parts_drops_hop_by_hop_date_and_skipped() {
        // `x-hop` and `x-other-hop` are hop-by-hop here: this response's `Connection` names them.
        let mut response = http::Response::new(());
        let h = response.headers_mut();
        h.insert(
            header::DATE,
            "Mon, 23 Nov 2026 10:00:00 GMT".parse().unwrap(),
        );
        h.insert(header::CONNECTION, "close".parse().unwrap());
        h.append(header::CONNECTION, "X-Hop, x-other-hop".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::PROXY_AUTHENTICATE, "Basic".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TRAILER, "grpc-status".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("x-other-hop", "2".parse().unwrap());
        h.insert("idempotency-key", "k".parse().unwrap());
        h.insert("x-secret", "s".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.append(header::SET_COOKIE, "a=1".parse().unwrap());
        h.append(header::SET_COOKIE, "b=2".parse().unwrap());
        let (parts, ()) = response.into_parts();
        let stored = StoredResponse::from_parts(
            &parts,
            &[],
            None,
            &HeaderName::from_static("idempotency-key"),
            &[HeaderName::from_static("x-secret")],
            false,
        );
        let names: Vec<_> = stored.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["trailer", "content-type", "set-cookie"]);
        // The headers left out take no room: the record is what its kept headers encode to.
        let kept = StoredResponse::new(stored.status(), stored.headers().clone(), Bytes::new());
        assert_eq!(stored.encode(), kept.encode());
        assert_eq!(StoredResponse::decode(&stored.encode()).unwrap(), stored);
        assert_eq!(
            stored.headers().get_all(header::SET_COOKIE).iter().count(),
            2
        );
        let without_cookies = StoredResponse::from_parts(
            &parts,
            &[],
            None,
            &HeaderName::from_static("idempotency-key"),
            &[],
            true,
        );
        let names: Vec<_> = without_cookies
            .headers()
            .keys()
            .map(|n| n.as_str())
            .collect();
        assert_eq!(names, ["trailer", "x-secret", "content-type"]);
    }
}
