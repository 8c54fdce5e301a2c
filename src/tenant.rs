//! Tenant scoping: which part of the key space a request's idempotency key lives in.
//!
//! The record key is (tenant, key): two tenants that send the same key never see each other's
//! responses. A tenant is stored only as a SHA-256 hash ([`TenantId`]), so a bearer token or API
//! key used to scope requests never reaches the store.

use std::fmt::{self, Write as _};
use std::marker::PhantomData;

use http::request::Parts;
use http::{HeaderName, StatusCode, header};
use sha2::{Digest, Sha256};

/// The hashed identity of a tenant: SHA-256 of what identifies it, with a domain tag so that a
/// header value and an extension value that happen to be equal do not collide by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId([u8; 32]);

impl TenantId {
    /// The one scope shared by every request that has no tenant of its own.
    pub const fn shared() -> Self {
        Self([0; 32])
    }

    /// The tenant identified by `bytes`, hashed.
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Self {
        Self::hash_parts("bytes", bytes.as_ref())
    }

    /// The tenant identified by the display of `value`, hashed (without an allocation).
    pub fn from_display(value: &impl fmt::Display) -> Self {
        struct HashWriter(Sha256);
        impl fmt::Write for HashWriter {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        let mut writer = HashWriter(Sha256::new_with_prefix(
            b"tower-idempotency:tenant:display\0",
        ));
        // Writing into a hasher cannot fail; a `Display` that reports an error still hashes
        // what it wrote.
        let _ = write!(writer, "{value}");
        Self(writer.0.finalize().into())
    }

    fn hash_parts(domain: &str, bytes: &[u8]) -> Self {
        let mut hasher = Sha256::new_with_prefix(b"tower-idempotency:tenant:");
        hasher.update(domain.as_bytes());
        hasher.update([0]);
        hasher.update(bytes);
        Self(hasher.finalize().into())
    }

    /// Whether this is the [`shared`](Self::shared) scope.
    pub fn is_shared(&self) -> bool {
        *self == Self::shared()
    }

    /// The 32 bytes of the hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds a tenant id from its 32 bytes, as read back from a store.
    pub const fn from_hash(bytes: [u8; 32]) -> Self {
        Self(bytes)
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
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
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
///         .map(|v| TenantId::from_bytes(v.as_bytes()))
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
/// shared scope.
///
/// Right for credentials that do not change between a request and its retry: static API keys
/// (`Bearer sk_live_…`), Basic auth. Wrong for the two setups most APIs run today:
///
/// - **Tokens that rotate** (OAuth2, JWT access tokens): a client that times out, refreshes
///   its token and retries with the same key lands in another scope, and the handler runs a
///   second time.
/// - **Cookie sessions**: without `Authorization`, every caller shares one scope, and a caller
///   who guesses another's key (and sends the same request) is served that caller's response.
///
/// For both, scope by the principal your auth middleware verified, with
/// [`TenantFromExtension`]. With the `tracing` feature, this extractor warns once per process
/// when it sees a bearer token shaped like a JWT, or a `Cookie` without `Authorization`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultTenant;

impl DefaultTenant {
    /// The scope of requests whose `Authorization` header is `authorization`: the same
    /// [`TenantId`] that [`extract`](TenantExtractor::extract) gives them, for looking a key up
    /// (see `Operator`). Requests without the header are in [`TenantId::shared`].
    ///
    /// ```
    /// use tower_idempotency::DefaultTenant;
    ///
    /// let tenant = DefaultTenant::scope_for("Bearer 4f1c2a");
    /// # let _ = tenant;
    /// ```
    pub fn scope_for(authorization: impl AsRef<[u8]>) -> TenantId {
        TenantId::hash_parts("authorization", authorization.as_ref())
    }
}

impl TenantExtractor for DefaultTenant {
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        match (values.next(), values.next()) {
            (None, _) => {
                #[cfg(feature = "tracing")]
                if parts.headers.contains_key(header::COOKIE) {
                    warn_once::cookie_without_authorization();
                }
                Ok(TenantId::shared())
            }
            (Some(value), None) => {
                #[cfg(feature = "tracing")]
                warn_once::if_jwt(value.as_bytes());
                Ok(Self::scope_for(value.as_bytes()))
            }
            (Some(_), Some(_)) => Err(TenantRejection::new(
                StatusCode::BAD_REQUEST,
                "the Authorization header was sent more than once",
            )),
        }
    }
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
            "a keyed request carries a Cookie but no Authorization, so it is in the one scope shared \
             by every caller: a caller who guesses another's key gets that caller's response. \
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

/// The tenant named by a request header, hashed, such as `X-Api-Key` or `X-Tenant-Id`.
///
/// A request without the header is rejected with `401` unless [`optional`](Self::optional)
/// lets it fall back to the shared scope; a header sent twice is rejected with `400`.
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

    /// Requests without the header share one scope instead of being rejected.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// The scope of requests whose header carries `value`: the same [`TenantId`] that
    /// [`extract`](TenantExtractor::extract) gives them, for looking a key up (see `Operator`).
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
        TenantId::hash_parts(self.name.as_str(), value.as_ref())
    }
}

impl TenantExtractor for TenantFromHeader {
    fn extract(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        let mut values = parts.headers.get_all(&self.name).iter();
        match (values.next(), values.next()) {
            (None, _) if self.optional => Ok(TenantId::shared()),
            (None, _) => Err(TenantRejection::new(
                StatusCode::UNAUTHORIZED,
                format!("the {} header is required", self.name),
            )),
            (Some(value), None) => Ok(TenantId::hash_parts(self.name.as_str(), value.as_bytes())),
            (Some(_), Some(_)) => Err(TenantRejection::new(
                StatusCode::BAD_REQUEST,
                format!("the {} header was sent more than once", self.name),
            )),
        }
    }
}

/// The tenant set by authentication middleware as a request extension of type `T`, hashed from
/// its `Display` (stable across processes, so every server of a fleet agrees).
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
        TenantId::from_display(value)
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
            .map(TenantId::from_display)
            .ok_or_else(|| {
                TenantRejection::new(StatusCode::UNAUTHORIZED, "the request is not authenticated")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

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
            TenantId::from_display(&"acct-1")
        );
    }

    #[test]
    fn display_is_hex() {
        let id = TenantId::from_bytes("x");
        let hex = id.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(TenantId::from_hash(*id.as_bytes()), id);
    }
}
