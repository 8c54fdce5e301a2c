//! Tenant scoping: which part of the key space a request's idempotency key lives in.
//!
//! The record key is (tenant, key): two tenants that send the same key never see each other's
//! responses. An extractor names a request's tenant as a SHA-256 digest ([`TenantId`]) of what
//! identifies it, under a namespace of its own; the layer then seals that digest with its
//! secret (HMAC-SHA256, see [`IdempotencyLayer::tenant_secret`](crate::IdempotencyLayer::tenant_secret))
//! before anything reaches the store, so that what is stored cannot be turned back into a
//! credential by trying candidates, unless one also holds the secret.

use std::fmt::{self, Write as _};
use std::marker::PhantomData;

use http::request::Parts;
use http::{HeaderName, HeaderValue, StatusCode, header};
use sha2::block_api::compress256;

use crate::util::{SHA256_INITIAL, Sha256, be_bytes};

/// The identity of a tenant: a 32-byte digest of what identifies it.
///
/// Extractors build it with [`hashed`](Self::hashed) (or the `scope_for` functions of the
/// built-in extractors); the layer seals it with its secret before it is stored, so a store
/// holds only sealed ids.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TenantId([u8; 32]);

/// A digest's bytes are uniform already: its four 8-byte words, folded into one by xor, are
/// hashed in one step (as a 32-byte slice, the hasher would take them in several).
impl std::hash::Hash for TenantId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let words = self.0.as_chunks::<8>().0;
        state.write_u64(
            words
                .iter()
                .fold(0, |folded, word| folded ^ u64::from_ne_bytes(*word)),
        );
    }
}

impl TenantId {
    /// The one scope shared by every request that has no tenant of its own. The layer refuses
    /// keyed requests in it unless [`shared_scope(true)`](crate::IdempotencyLayer::shared_scope).
    pub const fn shared() -> Self {
        Self([0; 32])
    }

    /// The tenant identified by `bytes`: their SHA-256 digest, in a namespace of its own (no
    /// built-in extractor's scope can equal it).
    pub fn hashed(bytes: impl AsRef<[u8]>) -> Self {
        Self::in_namespace(BYTES, bytes.as_ref())
    }

    /// The tenant identified by the display of `value`, hashed (without an allocation), in a
    /// namespace of its own.
    pub fn from_display(value: &impl fmt::Display) -> Self {
        Self::display_in_namespace(DISPLAY, value)
    }

    /// A digest of `value` in the namespace that `namespace` has absorbed (see [`namespace`]):
    /// the value comes last and needs no prefix.
    fn in_namespace(mut namespace: Sha256, value: &[u8]) -> Self {
        namespace.update(value);
        Self(namespace.finish())
    }

    fn display_in_namespace(namespace: Sha256, value: &impl fmt::Display) -> Self {
        struct HashWriter(Sha256);
        impl fmt::Write for HashWriter {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        let mut writer = HashWriter(namespace);
        // Writing into a hasher cannot fail; a `Display` that reports an error still hashes
        // what it wrote.
        let _ = write!(writer, "{value}");
        Self(writer.0.finish())
    }

    /// Whether this is the [`shared`](Self::shared) scope.
    pub fn is_shared(&self) -> bool {
        *self == Self::shared()
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A tenant id from its 32 bytes, kept as they are (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// A hasher that has absorbed the namespace (`kind`, `name`). The namespace's two parts are
/// length-prefixed, so that no choice of names makes two namespaces run into each other.
fn namespace(kind: &str, name: &str) -> Sha256 {
    let mut hasher = TENANT;
    for part in [kind, name] {
        hasher.update_u64(part.len() as u64);
        hasher.update(part.as_bytes());
    }
    hasher
}

/// What every tenant id's hash starts with.
const TENANT: Sha256 = Sha256::new().chain(b"tower-idempotency:tenant\0");

/// [`namespace`]`(kind, "")`, absorbed when the crate is compiled.
const fn unnamed(kind: &str) -> Sha256 {
    TENANT
        .chain(&(kind.len() as u64).to_be_bytes())
        .chain(kind.as_bytes())
        .chain(&0u64.to_be_bytes())
}

/// The namespaces of [`TenantId::hashed`], [`TenantId::from_display`] and [`DefaultTenant`].
const BYTES: Sha256 = unnamed("bytes");
const DISPLAY: Sha256 = unnamed("display");
const AUTHORIZATION: Sha256 = unnamed("authorization");

/// Seals the tenant ids that extractors produce before they reach a store: HMAC-SHA256 under
/// the layer's secret. The shared scope stays the shared scope (it names no one).
#[derive(Clone)]
pub(crate) struct Sealer {
    /// SHA-256's state once it has absorbed the key XOR ipad, and the key XOR opad: one block
    /// each (RFC 2104).
    inner: [u32; 8],
    outer: [u32; 8],
    /// Whether the key is the layer's own secret, rather than the public default.
    secret: bool,
}

/// The last block of a hash of 32 bytes one block past an HMAC key's: the 32 bytes (zeros
/// here), `0x80`, zeros, and the length in bits of the key's block and the 32 bytes.
const LAST_OF_32: [u8; 64] = {
    let mut block = [0; 64];
    block[32] = 0x80;
    let bits = ((64 + 32) * 8u64).to_be_bytes();
    let mut i = 0;
    while i < 8 {
        block[56 + i] = bits[i];
        i += 1;
    }
    block
};

/// The smallest secret accepted, in bytes.
pub(crate) const MIN_SECRET_LEN: usize = 16;

impl Sealer {
    /// A sealer keyed with `secret`.
    pub(crate) fn new(secret: &[u8]) -> Self {
        Self {
            secret: true,
            ..Self::keyed(secret)
        }
    }

    fn keyed(key: &[u8]) -> Self {
        let mut block = [0u8; 64];
        if key.len() > block.len() {
            let mut hasher = Sha256::new();
            hasher.update(key);
            block[..32].copy_from_slice(&hasher.finish());
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut padded = block;
            padded.iter_mut().for_each(|b| *b ^= byte);
            let mut state = SHA256_INITIAL;
            compress256(&mut state, &[padded]);
            state
        };
        Self {
            inner: pad(0x36),
            outer: pad(0x5c),
            secret: false,
        }
    }

    /// HMAC-SHA256 of `message` under this sealer's key (the tags of logged keys and tenants).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) fn mac(&self, message: &[u8]) -> [u8; 32] {
        let hash = |state, message: &[u8]| {
            let mut hasher = Sha256::after_blocks(state, 1);
            hasher.update(message);
            hasher.finish()
        };
        hash(self.outer, &hash(self.inner, message))
    }

    /// [`mac`](Self::mac) of 32 bytes (a tenant id: every keyed request seals one, replays
    /// included): each of its two hashes is one block past the key's, the same block but for
    /// its first 32 bytes.
    fn mac_32(&self, message: &[u8; 32]) -> [u8; 32] {
        let mut block = LAST_OF_32;
        block[..32].copy_from_slice(message);
        let mut inner = self.inner;
        compress256(&mut inner, std::slice::from_ref(&block));
        block[..32].copy_from_slice(&be_bytes(inner));
        let mut outer = self.outer;
        compress256(&mut outer, std::slice::from_ref(&block));
        be_bytes(outer)
    }

    /// The tenant id that is stored for the id `tenant` an extractor produced.
    pub(crate) fn seal(&self, tenant: TenantId) -> TenantId {
        if tenant.is_shared() {
            return tenant;
        }
        TenantId(self.mac_32(&tenant.0))
    }
}

impl Default for Sealer {
    /// The public default key: without a secret of the app's, a stored tenant id is still not a
    /// plain hash of a credential, but anyone who knows this crate can try candidates against
    /// it. Set [`tenant_secret`](crate::IdempotencyLayer::tenant_secret) in production.
    fn default() -> Self {
        Self::keyed(b"tower-idempotency:tenant-secret:public-default")
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.secret {
            "<secret>"
        } else {
            "<public default>"
        };
        f.debug_tuple("Sealer")
            .field(&format_args!("{key}"))
            .finish()
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({self})")
    }
}

/// Lowercase hex of the 32 bytes.
impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::util::Hex(&self.0).fmt(f)
    }
}

/// A request refused because its tenant could not be determined.
///
/// Rendered with the layer's error renderer, code `idempotency_tenant_rejected`, with the
/// status of your choosing (for example `401` when authentication is missing).
#[derive(Debug, Clone)]
pub struct TenantRejection {
    status: StatusCode,
    detail: String,
}

impl TenantRejection {
    /// A rejection answered with `status` and a human-readable `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }

    /// The status the request is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human-readable reason.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// Decides the tenant of a request.
///
/// Implemented for closures `Fn(&Parts) -> Result<TenantId, TenantRejection>`, and by
/// [`DefaultTenant`], [`TenantFromHeader`] and [`TenantFromExtension`].
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantId, TenantRejection};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new()).tenant(|parts: &http::request::Parts| {
///     parts
///         .headers
///         .get("x-account-id")
///         .map(|v| TenantId::hashed(v.as_bytes()))
///         .ok_or_else(|| TenantRejection::new(StatusCode::UNAUTHORIZED, "missing x-account-id"))
/// });
/// # let _ = layer;
/// ```
pub trait TenantExtractor: Send + Sync + 'static {
    /// The tenant of the request whose head is `parts`.
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection>;
}

impl<F> TenantExtractor for F
where
    F: Fn(&Parts) -> Result<TenantId, TenantRejection> + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        self(parts)
    }
}

/// The default tenant: a hash of the `Authorization` header when present, otherwise the one
/// shared scope (also for a header without credentials: empty, an authentication scheme alone
/// such as `Bearer` or `Negotiate`, or `null` or `undefined`, alone or after a scheme).
///
/// Right for credentials that do not change between a request and its retry: static API keys
/// (`Bearer sk_live_…`), Basic auth. Wrong for the two setups most APIs run today:
///
/// - **Tokens that rotate** (OAuth2, JWT access tokens): a client that times out, refreshes
///   its token and retries with the same key lands in another scope, and the handler runs a
///   second time.
/// - **Cookie sessions**: without `Authorization`, keyed requests are refused with `400`
///   (`idempotency_tenant_missing`); with
///   [`shared_scope(true)`](crate::IdempotencyLayer::shared_scope) every caller shares one
///   scope, and a caller who guesses another's key (and sends the same request) is served that
///   caller's response.
///
/// For both, scope by the principal your auth middleware verified, with
/// [`TenantFromExtension`]. With the `tracing` feature, this extractor warns once per process
/// when it sees a bearer token shaped like a JWT, or a `Cookie` without `Authorization`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultTenant;

impl DefaultTenant {
    /// The scope of requests whose `Authorization` header is `authorization`: the same
    /// [`TenantId`] that [`extract`](TenantExtractor::extract) gives them, for looking a key up
    /// (see `Operator`). Requests without the header, or whose header carries no credentials
    /// (empty, or an authentication scheme alone, such as `Bearer `), identify no caller: they
    /// are in [`TenantId::shared`].
    ///
    /// ```
    /// use tower_idempotency::DefaultTenant;
    ///
    /// let tenant = DefaultTenant::scope_for("Bearer 4f1c2a");
    /// # let _ = tenant;
    /// ```
    pub fn scope_for(authorization: impl AsRef<[u8]>) -> TenantId {
        let authorization = authorization.as_ref();
        if !has_credentials(authorization) {
            return TenantId::shared();
        }
        Self::of_credentials(authorization)
    }

    /// The scope of an `Authorization` value that carries credentials. Whitespace around the
    /// value is not part of it (RFC 9110, section 5.5): a retry whose header is written with it
    /// is the same caller.
    fn of_credentials(authorization: &[u8]) -> TenantId {
        TenantId::in_namespace(AUTHORIZATION, authorization.trim_ascii())
    }
}

impl TenantExtractor for DefaultTenant {
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        match crate::util::first_two(&parts.headers, &header::AUTHORIZATION) {
            (Some(value), None) if has_credentials(value.as_bytes()) => {
                #[cfg(feature = "tracing")]
                warn_once::if_jwt(value.as_bytes());
                Ok(Self::of_credentials(value.as_bytes()))
            }
            // No header, or one without credentials.
            (_, None) => {
                #[cfg(feature = "tracing")]
                if parts.headers.contains_key(header::COOKIE) {
                    warn_once::cookie_without_authorization();
                }
                Ok(TenantId::shared())
            }
            (_, Some(_)) => Err(TenantRejection::new(
                StatusCode::BAD_REQUEST,
                "the Authorization header was sent more than once",
            )),
        }
    }
}

/// Whether an `Authorization` value carries credentials. An empty value, an authentication scheme
/// alone (those of IANA's registry, and `NTLM` and `Token`), or what a browser client writes from a
/// missing token (`null`, `undefined`, alone or after a scheme) names no caller, and would
/// otherwise put every caller that sends it in one scope that is not the shared one. A single token
/// of another kind (an API key sent without a scheme) is a credential.
fn has_credentials(authorization: &[u8]) -> bool {
    let value = authorization.trim_ascii();
    match value.last() {
        None => return false,
        // It may end in a missing token (`null`, `undefined`): see below.
        Some(b'l' | b'L' | b'd' | b'D') => {}
        // It does not: it names no caller only when it is a scheme alone.
        Some(_) => return !is_scheme(value),
    }
    // What a browser client writes for a token it does not have.
    let missing =
        |t: &[u8]| t.eq_ignore_ascii_case(b"null") || t.eq_ignore_ascii_case(b"undefined");
    match value.iter().position(|&b| b == b' ' || b == b'\t') {
        // One token: a scheme alone, or an API key sent without a scheme.
        None => !(missing(value) || is_scheme(value)),
        Some(at) => {
            let (scheme, token) = (&value[..at], value[at..].trim_ascii());
            !(missing(token) && is_scheme(scheme))
        }
    }
}

/// Whether `name` is an authentication scheme (any case): those of IANA's registry, and `NTLM`
/// and `Token`. Only the schemes of its length are compared.
fn is_scheme(name: &[u8]) -> bool {
    let schemes: &[&[u8]] = match name.len() {
        4 => &[b"dpop", b"gnap", b"hoba", b"ntlm"],
        5 => &[b"basic", b"oauth", b"token", b"vapid"],
        6 => &[b"bearer", b"digest", b"mutual"],
        9 => &[b"concealed", b"negotiate"],
        11 => &[b"scram-sha-1"],
        12 => &[b"privatetoken"],
        13 => &[b"scram-sha-256"],
        _ => &[],
    };
    schemes.iter().any(|known| name.eq_ignore_ascii_case(known))
}

/// The warnings of the default tenant, each logged once per process.
#[cfg(feature = "tracing")]
mod warn_once {
    use std::sync::atomic::{AtomicBool, Ordering};

    static JWT: AtomicBool = AtomicBool::new(false);
    static COOKIE: AtomicBool = AtomicBool::new(false);

    /// `true` the first time only.
    fn first(flag: &AtomicBool) -> bool {
        !flag.load(Ordering::Relaxed) && !flag.swap(true, Ordering::Relaxed)
    }

    /// Warns, once, when `authorization` is a bearer token shaped like a JWT: three base64url
    /// segments. Its claims are never read: the token is not verified here.
    pub(super) fn if_jwt(authorization: &[u8]) {
        if JWT.load(Ordering::Relaxed) || !is_bearer_jwt(authorization) || !first(&JWT) {
            return;
        }
        tracing::warn!(
            target: "tower_idempotency",
            "idempotency keys are scoped by the Authorization header, which carries a JWT: when \
             the client refreshes its token and retries, the retry lands in another scope and the \
             handler runs twice. Scope by the verified principal instead: \
             IdempotencyLayer::tenant(TenantFromExtension::<YourPrincipal>::new())"
        );
    }

    /// Warns, once, about a covered request with a `Cookie` and no `Authorization`.
    pub(super) fn cookie_without_authorization() {
        if COOKIE.load(Ordering::Relaxed) || !first(&COOKIE) {
            return;
        }
        tracing::warn!(
            target: "tower_idempotency",
            "a keyed request carries a Cookie but no Authorization, so it has no tenant of its \
             own: it is refused (400), or with shared_scope(true) put in the one scope shared by \
             every caller, where a caller who guesses another's key gets that caller's response. \
             Scope by the session's verified principal: \
             IdempotencyLayer::tenant(TenantFromExtension::<YourPrincipal>::new())"
        );
    }

    pub(super) fn is_bearer_jwt(authorization: &[u8]) -> bool {
        let Some(token) = authorization
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &authorization[7..])
        else {
            return false;
        };
        let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        let mut segments = token.split(|&b| b == b'.');
        let (Some(header), Some(claims), Some(signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return false;
        };
        !header.is_empty()
            && !claims.is_empty()
            && [header, claims, signature]
                .iter()
                .all(|s| s.iter().all(base64url))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn jwt_shapes() {
            for jwt in [
                "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl",
                "bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.",
            ] {
                assert!(super::is_bearer_jwt(jwt.as_bytes()), "{jwt}");
            }
            for not_jwt in [
                "Bearer sk_live_4f1c2a",
                "Basic dXNlcjpwYXNz",
                "Bearer a.b",
                "Bearer a.b.c.d",
                "Bearer a b.c.d",
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln",
            ] {
                assert!(!super::is_bearer_jwt(not_jwt.as_bytes()), "{not_jwt}");
            }
        }
    }
}

/// The tenant named by a request header, hashed, such as `X-Api-Key`.
///
/// **Only for a header whose value proves who the caller is**: a secret API key, or a header
/// that your gateway sets after it verified the caller (and strips from what clients send).
/// A stored response is replayed before your handler runs, so before any membership check of
/// the handler's: with a header the client chooses freely, such as an `X-Tenant-Id` naming an
/// organisation, anyone who sends another organisation's id and one of its keys reads that
/// organisation's stored response. For a tenant that your auth middleware verified, use
/// [`TenantFromExtension`].
///
/// A request without the header, or with an empty one, is rejected with `401` unless
/// [`optional`](Self::optional) lets it fall back to the shared scope (which the layer then
/// refuses unless it has [`shared_scope(true)`](crate::IdempotencyLayer::shared_scope)); a
/// header sent twice is rejected with `400`. Each header name is a namespace of its own.
#[derive(Debug, Clone)]
pub struct TenantFromHeader {
    name: HeaderName,
    optional: bool,
}

impl TenantFromHeader {
    /// Scopes by the value of the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            optional: false,
        }
    }

    /// Requests without the header (or with an empty one) share one scope instead of being
    /// rejected.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// The scope of requests whose header carries `value`: the same [`TenantId`] that
    /// [`extract`](TenantExtractor::extract) gives them, for looking a key up (see `Operator`).
    /// An empty value names no tenant: [`TenantId::shared`].
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::TenantFromHeader;
    ///
    /// let tenants = TenantFromHeader::new(HeaderName::from_static("x-api-key"));
    /// let tenant = tenants.scope_for("key_live_1234");
    /// # let _ = tenant;
    /// ```
    pub fn scope_for(&self, value: impl AsRef<[u8]>) -> TenantId {
        // Whitespace around the value is not part of it (RFC 9110, section 5.5).
        let value = value.as_ref().trim_ascii();
        if value.is_empty() {
            return TenantId::shared();
        }
        TenantId::in_namespace(namespace("header", self.name.as_str()), value)
    }
}

impl TenantExtractor for TenantFromHeader {
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        let mut values = parts.headers.get_all(&self.name).iter();
        // An empty value names no tenant: it counts as no header.
        let named = |value: &HeaderValue| !value.as_bytes().trim_ascii().is_empty();
        match (values.next().filter(|value| named(value)), values.next()) {
            (None, None) if self.optional => Ok(TenantId::shared()),
            (None, None) => Err(TenantRejection::new(
                StatusCode::UNAUTHORIZED,
                format!("the {} header is required", self.name),
            )),
            (Some(value), None) => Ok(self.scope_for(value.as_bytes())),
            (_, Some(_)) => Err(TenantRejection::new(
                StatusCode::BAD_REQUEST,
                format!("the {} header was sent more than once", self.name),
            )),
        }
    }
}

/// The tenant set by authentication middleware as a request extension of type `T`, hashed from
/// the type's name and the value's `Display` (stable across processes, so every server of a
/// fleet agrees).
///
/// The type's name ([`std::any::type_name`]) is the namespace: an `AccountId(42)` and a
/// `UserId(42)` that display alike are still two tenants, even on one store. Renaming or moving
/// the type changes every scope (a retry that spans that deploy runs again), as does a
/// `Display` that changes.
///
/// A request without the extension is rejected with `401`: it was not authenticated, and
/// sharing a scope by accident would let one client replay another's response.
pub struct TenantFromExtension<T> {
    _marker: PhantomData<fn() -> T>,
}

impl<T> TenantFromExtension<T> {
    /// Scopes by the request extension of type `T`.
    pub fn new() -> Self {
        Self {
            _marker: PhantomData,
        }
    }

    /// The scope of requests whose extension is `value`: the same [`TenantId`] that
    /// [`extract`](TenantExtractor::extract) gives them, for looking a key up (see `Operator`).
    ///
    /// ```
    /// use tower_idempotency::TenantFromExtension;
    ///
    /// let tenant = TenantFromExtension::<u64>::scope_for(&42);
    /// # let _ = tenant;
    /// ```
    pub fn scope_for(value: &T) -> TenantId
    where
        T: fmt::Display,
    {
        let namespace = namespace("extension", std::any::type_name::<T>());
        TenantId::display_in_namespace(namespace, value)
    }
}

impl<T> Default for TenantFromExtension<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for TenantFromExtension<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for TenantFromExtension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantFromExtension")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> TenantExtractor for TenantFromExtension<T>
where
    T: fmt::Display + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        parts
            .extensions
            .get::<T>()
            .map(Self::scope_for)
            .ok_or_else(|| {
                TenantRejection::new(StatusCode::UNAUTHORIZED, "the request is not authenticated")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use sha2::Digest;

    fn parts(build: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        build(Request::builder()).body(()).unwrap().into_parts().0
    }

    #[test]
    fn default_tenant_hashes_authorization() {
        let a = parts(|b| b.header("authorization", "Bearer a"));
        let b = parts(|b| b.header("authorization", "Bearer b"));
        let none = parts(|b| b);
        let ta = DefaultTenant.extract(&a).unwrap();
        assert_ne!(ta, DefaultTenant.extract(&b).unwrap());
        assert_eq!(ta, DefaultTenant.extract(&a).unwrap());
        assert_eq!(DefaultTenant.extract(&none).unwrap(), TenantId::shared());
        assert!(!ta.to_string().contains("Bearer"));
    }

    #[test]
    fn an_authorization_without_credentials_names_no_tenant() {
        // (value, whether it names a caller). A key sent without a scheme is a credential.
        let values = [
            ("", false),
            ("   ", false),
            ("Bearer", false),
            ("Bearer  ", false),
            ("basic", false),
            (" BEARER ", false),
            ("Negotiate", false),
            ("Digest", false),
            ("token", false),
            ("NTLM", false),
            ("DPoP", false),
            ("Bearer null", false),
            ("bearer undefined", false),
            ("Bearer\tnull ", false),
            ("null", false),
            ("Undefined", false),
            ("Token null", false),
            ("Basic undefined", false),
            // However much space comes between the scheme and the missing token.
            ("Bearer                              null", false),
            ("SCRAM-SHA-256 \t          undefined  ", false),
            ("Bearer                              x", true),
            ("sk_live_123", true),
            ("Bearer x", true),
            ("Basic YTpi", true),
            ("Token abc", true),
            ("Negotiate YIIB", true),
            ("Bearer nullx", true),
            ("nullable", true),
            ("Bearer sk_live_0123456789abcdefghijklmnop", true),
        ];
        for (value, names_a_caller) in values {
            let request = parts(|b| b.header("authorization", value));
            let tenant = DefaultTenant.extract(&request).unwrap();
            assert_eq!(tenant != TenantId::shared(), names_a_caller, "{value:?}");
            assert_eq!(tenant, DefaultTenant::scope_for(value), "{value:?}");
        }
    }

    /// Whether a value names a caller is decided as it was before the check of a value that
    /// does not end in a missing token took a shortcut: the former check, compared on every
    /// scheme, missing token and separator, in several cases.
    #[test]
    fn credentials_are_told_as_before() {
        fn reference(authorization: &[u8]) -> bool {
            static SCHEMES: [&[u8]; 16] = [
                b"basic",
                b"bearer",
                b"concealed",
                b"digest",
                b"dpop",
                b"gnap",
                b"hoba",
                b"mutual",
                b"negotiate",
                b"ntlm",
                b"oauth",
                b"privatetoken",
                b"scram-sha-1",
                b"scram-sha-256",
                b"token",
                b"vapid",
            ];
            let value = authorization.trim_ascii();
            let missing =
                |t: &[u8]| t.eq_ignore_ascii_case(b"null") || t.eq_ignore_ascii_case(b"undefined");
            let is_scheme = |s: &[u8]| SCHEMES.iter().any(|known| s.eq_ignore_ascii_case(known));
            match value.iter().position(|&b| b == b' ' || b == b'\t') {
                None => !(value.is_empty() || missing(value) || is_scheme(value)),
                Some(at) => {
                    let (scheme, token) = (&value[..at], value[at..].trim_ascii());
                    !(missing(token) && is_scheme(scheme))
                }
            }
        }
        let schemes = [
            "basic",
            "Bearer",
            "CONCEALED",
            "digest",
            "DPoP",
            "gnap",
            "hoba",
            "mutual",
            "Negotiate",
            "NTLM",
            "oauth",
            "PrivateToken",
            "SCRAM-SHA-1",
            "scram-sha-256",
            "Token",
            "vapid",
            "bearerx",
            "bear",
            "",
            "x",
            "sk_live_1",
            "null",
            "Undefined",
        ];
        let tokens = [
            "",
            "null",
            "NULL",
            "undefined",
            "unDefined",
            "nul",
            "xnull",
            "null x",
            "x null",
            "undefinedx",
            "abc",
            "x undefined",
            "\tnull",
        ];
        let gaps = ["", " ", "\t", "  \t ", "\n"];
        for scheme in schemes {
            for token in tokens {
                for gap in gaps {
                    for around in ["", " ", "\t\r\n"] {
                        let value = format!("{around}{scheme}{gap}{token}{around}");
                        assert_eq!(
                            has_credentials(value.as_bytes()),
                            reference(value.as_bytes()),
                            "{value:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_tenant_header_counts_as_none() {
        let extractor = TenantFromHeader::new(HeaderName::from_static("x-tenant"));
        let empty = parts(|b| b.header("x-tenant", " "));
        assert_eq!(
            extractor.extract(&empty).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            extractor.clone().optional().extract(&empty).unwrap(),
            TenantId::shared()
        );
        assert_eq!(extractor.scope_for(" "), TenantId::shared());
        let with_empty = parts(|b| b.header("x-tenant", "").header("x-tenant", "a"));
        assert_eq!(
            extractor.extract(&with_empty).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn header_tenant_requires_the_header() {
        let extractor = TenantFromHeader::new(HeaderName::from_static("x-tenant"));
        let err = extractor.extract(&parts(|b| b)).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        let twice = parts(|b| b.header("x-tenant", "a").header("x-tenant", "b"));
        assert_eq!(
            extractor.extract(&twice).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
        let optional = extractor.clone().optional();
        assert_eq!(optional.extract(&parts(|b| b)).unwrap(), TenantId::shared());
        let one = parts(|b| b.header("x-tenant", "a"));
        assert_ne!(extractor.extract(&one).unwrap(), TenantId::shared());
    }

    #[test]
    fn extension_tenant_hashes_display() {
        #[derive(Clone)]
        struct Account(u64);
        impl fmt::Display for Account {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "acct-{}", self.0)
            }
        }
        let extractor = TenantFromExtension::<Account>::new();
        assert_eq!(
            extractor.extract(&parts(|b| b)).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        let one = parts(|b| b.extension(Account(1)));
        let two = parts(|b| b.extension(Account(2)));
        assert_ne!(
            extractor.extract(&one).unwrap(),
            extractor.extract(&two).unwrap()
        );
        assert_eq!(
            extractor.extract(&one).unwrap(),
            TenantFromExtension::<Account>::scope_for(&Account(1))
        );
        assert_ne!(
            extractor.extract(&one).unwrap(),
            TenantId::from_display(&"acct-1")
        );
    }

    #[test]
    fn extractors_have_namespaces_of_their_own() {
        struct AccountId(u64);
        struct UserId(u64);
        impl fmt::Display for AccountId {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl fmt::Display for UserId {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        let account = TenantFromExtension::<AccountId>::scope_for(&AccountId(42));
        let user = TenantFromExtension::<UserId>::scope_for(&UserId(42));
        assert_ne!(account, user);
        // A header named like a built-in namespace is still a header's namespace.
        for name in ["display", "authorization", "bytes", "extension"] {
            let header = TenantFromHeader::new(HeaderName::from_static(name));
            assert_ne!(header.scope_for("42"), TenantId::from_display(&42));
            assert_ne!(header.scope_for("42"), DefaultTenant::scope_for("42"));
            assert_ne!(header.scope_for("42"), TenantId::hashed("42"));
        }
        // Length-prefixed: moving bytes between the name and the value changes the scope.
        let ab = TenantFromHeader::new(HeaderName::from_static("x-ab")).scope_for("c");
        let a = TenantFromHeader::new(HeaderName::from_static("x-a")).scope_for("bc");
        assert_ne!(ab, a);
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1, 3, 4 and 7 of RFC 4231: keys of 20, 20, 25 and 131 bytes, messages of
        // 8, 50, 50 and 152 bytes (the last one past a block and its padding).
        let key_4: Vec<u8> = (1..=25).collect();
        let cases: [(&[u8], &[u8], &str); 4] = [
            (
                &[0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                &[0xaa; 20],
                &[0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                &key_4,
                &[0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                &[0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than \
                  block-size data. The key needs to be hashed before being used by the HMAC \
                  algorithm.",
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, message, mac) in cases {
            // `Sealer::new` takes secrets of 16 bytes and more (the layer checks that); the
            // HMAC itself takes any key.
            assert_eq!(crate::util::hex(&Sealer::new(key).mac(message)), mac);
        }
        // Test case 2 of RFC 4231.
        let mac = Sealer::new(b"Jefe").mac(b"what do ya want for nothing?");
        assert_eq!(
            crate::util::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let mac = Sealer::new(&[0xaa; 131])
            .mac(b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(
            crate::util::hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// The HMAC of messages of every length around SHA-256's block and padding boundaries (55,
    /// 56, 64, 119, 120, 128 bytes) is the one a `Sha256` hasher computes, under the public
    /// default key and secrets of every length class.
    #[test]
    fn hmac_matches_a_hasher_s_at_every_length() {
        fn reference(key: &[u8], message: &[u8]) -> [u8; 32] {
            let mut block = [0u8; 64];
            if key.len() > 64 {
                block[..32].copy_from_slice(&sha2::Sha256::digest(key));
            } else {
                block[..key.len()].copy_from_slice(key);
            }
            let pad = |byte: u8| block.map(|b| b ^ byte);
            let inner = sha2::Sha256::new_with_prefix(pad(0x36))
                .chain_update(message)
                .finalize();
            sha2::Sha256::new_with_prefix(pad(0x5c))
                .chain_update(inner)
                .finalize()
                .into()
        }
        let public = b"tower-idempotency:tenant-secret:public-default";
        let keys: [&[u8]; 4] = [public, &[7; 16], &[9; 64], &[3; 65]];
        for key in keys {
            let sealer = if key == public {
                Sealer::default()
            } else {
                Sealer::new(key)
            };
            for len in 0..200 {
                let message: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                assert_eq!(sealer.mac(&message), reference(key, &message), "{len}");
            }
            for byte in [5, 0xff] {
                let tenant = TenantId([byte; 32]);
                assert_eq!(sealer.seal(tenant), TenantId(reference(key, &tenant.0)));
                assert_eq!(sealer.mac(&tenant.0), reference(key, &tenant.0));
            }
        }
    }

    /// What a credential's tenant is stored as does not change from one version to the next
    /// (these values were computed by the versions before this test): the records written
    /// before an upgrade are found by the retries after it.
    #[test]
    fn stored_tenant_ids_do_not_change() {
        let tenant = DefaultTenant::scope_for("Bearer sk_live_stable");
        let stored = [
            (
                tenant,
                "f3d42e480d6c490dc5582a654bc76602455bb97b4b77b30693e31ebf31111226",
            ),
            (
                Sealer::default().seal(tenant),
                "05b82b8cc91fca0e4b478e69bf69b38ae52d787a2eed5a82621a212c5c0449b7",
            ),
            (
                Sealer::new(b"a secret of 16 b").seal(tenant),
                "8489ff3755412537f0f8dabace54fee0094d64325e657a63775e8dab6144d9aa",
            ),
        ];
        for (id, hex) in stored {
            assert_eq!(id.to_string(), hex);
        }
    }

    /// Whitespace around a header's value is not part of it (RFC 9110, section 5.5): written
    /// with it (by a proxy, in HTTP/2, by a client that builds the value by hand), the value
    /// names the same tenant, whose id is the one stored for it without.
    #[test]
    fn whitespace_around_a_value_is_not_part_of_the_tenant() {
        let plain = DefaultTenant::scope_for("Bearer sk_live_stable");
        for padded in [
            " Bearer sk_live_stable",
            "Bearer sk_live_stable\t",
            "\t Bearer sk_live_stable ",
        ] {
            assert_eq!(DefaultTenant::scope_for(padded), plain, "{padded:?}");
            let request = parts(|b| b.header(header::AUTHORIZATION, padded));
            assert_eq!(
                DefaultTenant.extract(&request).unwrap(),
                plain,
                "{padded:?}"
            );
        }
        let name = HeaderName::from_static("x-tenant");
        let tenants = TenantFromHeader::new(name.clone());
        let plain = tenants.scope_for("acct_1");
        for padded in [" acct_1", "acct_1\t", " \tacct_1 "] {
            assert_eq!(tenants.scope_for(padded), plain, "{padded:?}");
            let request = parts(|b| b.header(&name, padded));
            assert_eq!(tenants.extract(&request).unwrap(), plain, "{padded:?}");
        }
        assert_ne!(plain, tenants.scope_for("acct_2"));
    }

    /// Every namespace hashes as it always did (SHA-256 of the prefix, the length-prefixed
    /// kind and name, then the value): the tenant ids of records written before an upgrade
    /// are the ones after it.
    #[test]
    fn namespaces_hash_as_before() {
        fn reference(kind: &str, name: &str, value: &[u8]) -> TenantId {
            let mut hasher = sha2::Sha256::new_with_prefix(b"tower-idempotency:tenant\0");
            for part in [kind, name] {
                hasher.update((part.len() as u64).to_be_bytes());
                hasher.update(part.as_bytes());
            }
            hasher.update(value);
            TenantId(hasher.finalize().into())
        }
        let values: Vec<String> = (0..140).map(|len| "v".repeat(len)).collect();
        for value in &values {
            let authorization = format!("Bearer {value}x");
            assert_eq!(
                DefaultTenant::scope_for(&authorization),
                reference("authorization", "", authorization.as_bytes())
            );
            assert_eq!(
                TenantId::hashed(value),
                reference("bytes", "", value.as_bytes())
            );
            assert_eq!(
                TenantId::from_display(value),
                reference("display", "", value.as_bytes())
            );
            let header = TenantFromHeader::new(HeaderName::from_static("x-api-key"));
            assert_eq!(
                header.scope_for(format!("{value}x")),
                reference("header", "x-api-key", format!("{value}x").as_bytes())
            );
            assert_eq!(
                TenantFromExtension::<String>::scope_for(value),
                reference(
                    "extension",
                    std::any::type_name::<String>(),
                    value.as_bytes()
                )
            );
        }
    }

    #[test]
    fn sealing_depends_on_the_secret_and_keeps_the_shared_scope() {
        let tenant = DefaultTenant::scope_for("Basic dXNlcjpwYXNz");
        let (one, two) = (Sealer::new(&[1; 32]), Sealer::new(&[2; 32]));
        assert_ne!(one.seal(tenant), two.seal(tenant));
        assert_eq!(one.seal(tenant), Sealer::new(&[1; 32]).seal(tenant));
        assert_ne!(Sealer::default().seal(tenant), tenant);
        assert_ne!(Sealer::default().seal(tenant), one.seal(tenant));
        assert_eq!(one.seal(TenantId::shared()), TenantId::shared());
    }

    #[test]
    fn display_is_hex() {
        let id = TenantId::hashed("x");
        let hex = id.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(TenantId::from_bytes(*id.as_bytes()), id);
    }
}
