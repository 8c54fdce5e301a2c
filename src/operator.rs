//! Support tools: look a key up, and forget it so that the next request with it runs.
//!
//! The layer never calls these; an operator does, from an admin route or a command-line tool,
//! when a customer's retry "keeps getting the old answer" or a key "is stuck".

use std::fmt;
use std::time::{Duration, SystemTime};

use http::StatusCode;

use crate::fingerprint::Fingerprint;
use crate::key::{KeyError, parse_value};
use crate::store::{Forget, IdempotencyStore, RecordKey, RecordState, StoreError};
use crate::tenant::{MIN_SECRET_LEN, Sealer, TenantId};

/// How many bytes of the fingerprint a [`KeyReport`] shows, in hex: enough to tell two requests
/// apart, not a value to rebuild anything from.
const FINGERPRINT_PREFIX_BYTES: usize = 8;

/// Looks keys up in a store and forgets them, for operators.
///
/// Built from the store the layer uses (stores are cheap to clone and share their state; or wrap
/// yours in an `Arc`). A key is named by its tenant scope and the key as the client sent it:
/// build the scope from the raw value your [`TenantExtractor`](crate::TenantExtractor) sees with
/// [`DefaultTenant::scope_for`](crate::DefaultTenant::scope_for),
/// [`TenantFromHeader::scope_for`](crate::TenantFromHeader::scope_for) or
/// [`TenantFromExtension::scope_for`](crate::TenantFromExtension::scope_for); the key is
/// validated and unquoted as the layer does.
///
/// Nothing here is exposed by the layer: mount it behind your own authentication, if at all
/// (`examples/admin.rs` does, as an admin route).
///
/// ```
/// use tower_idempotency::{DefaultTenant, Forget, IdempotencyLayer, MemoryStore, Operator};
///
/// # async fn run() -> Result<(), tower_idempotency::OperatorError> {
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// // With the layer's tenant secret, if it has one (`Operator::new(store).tenant_secret(..)`
/// // for a store shared with layers elsewhere).
/// let operator = layer.operator();
///
/// let tenant = DefaultTenant::scope_for("Bearer sk_live_123");
/// if let Some(report) = operator.lookup(tenant, "8e03978e-40d5-43e8").await? {
///     println!("{report}");
///     if !report.is_in_flight() {
///         assert_eq!(operator.forget(tenant, "8e03978e-40d5-43e8").await?, Forget::Forgotten);
///     }
/// }
/// # Ok(())
/// # }
/// ```
///
/// A store that does not implement [`lookup`](IdempotencyStore::lookup) and
/// [`forget`](IdempotencyStore::forget) answers [`OperatorError::Store`] with
/// [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported).
#[derive(Debug, Clone)]
pub struct Operator<St> {
    store: St,
    sealer: Sealer,
}

impl<St: IdempotencyStore> Operator<St> {
    /// An operator over `store`: pass the layer's store (`layer.store().clone()`), or another
    /// handle to the same shared store.
    pub fn new(store: St) -> Self {
        Self {
            store,
            sealer: Sealer::default(),
        }
    }

    /// An operator over `store` whose tenant ids are sealed as a layer's are.
    pub(crate) fn sealed(store: St, sealer: Sealer) -> Self {
        Self { store, sealer }
    }

    /// The layer's [`tenant_secret`](crate::IdempotencyLayer::tenant_secret): an operator
    /// finds the records of a layer with a secret only with the same secret.
    ///
    /// ```
    /// # use tower_idempotency::{MemoryStore, Operator};
    /// # let secret_from_your_vault = vec![7u8; 32];
    /// let operator = Operator::new(MemoryStore::new()).tenant_secret(&secret_from_your_vault);
    /// ```
    ///
    /// # Panics
    ///
    /// If `secret` is shorter than 16 bytes, as the layer's.
    #[must_use]
    pub fn tenant_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        assert!(
            secret.len() >= MIN_SECRET_LEN,
            "Operator::tenant_secret must be at least {MIN_SECRET_LEN} bytes"
        );
        self.sealer = Sealer::new(secret);
        self
    }

    /// The record key of (`tenant`, `key`) as the layer stores it: the tenant sealed with the
    /// secret (see [`tenant_secret`](Self::tenant_secret)), the key validated and unquoted.
    /// For finding a record by hand in a shared store (a Redis key, a PostgreSQL row).
    ///
    /// # Errors
    ///
    /// [`OperatorError::InvalidKey`] when the layer would refuse the key.
    pub fn record_key(&self, tenant: TenantId, key: &str) -> Result<RecordKey, OperatorError> {
        record_key(self.sealer.seal(tenant), key)
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The record of `key` in the scope of `tenant`, as it is now; `None` when there is no live
    /// record (never used, released, or expired). Never changes the record.
    ///
    /// `key` is the `Idempotency-Key` header value as the client sent it: a bare token or a
    /// quoted string.
    ///
    /// # Errors
    ///
    /// [`OperatorError::InvalidKey`] when the layer would refuse the key (no record can have
    /// it), [`OperatorError::Store`] when the store fails or does not support lookups.
    pub async fn lookup(
        &self,
        tenant: TenantId,
        key: &str,
    ) -> Result<Option<KeyReport>, OperatorError> {
        let record = self.record_key(tenant, key)?;
        let info = self.store.lookup(&record).await?;
        Ok(info.map(|info| KeyReport {
            tenant: *record.tenant(),
            key: record.key().to_owned(),
            fingerprint: info.fingerprint,
            state: info.state,
        }))
    }

    /// Forgets the completed record of `key`, so that the next request with the key runs the
    /// handler again (and may charge again: forget only what the customer asked to redo).
    ///
    /// Answers [`Forget::Forgotten`] when the record was removed, [`Forget::NotFound`] when
    /// there was no live record, and [`Forget::InFlight`] when a request holds the key: it is
    /// left alone (see [`forget_in_flight`](Self::forget_in_flight)).
    ///
    /// # Errors
    ///
    /// As [`lookup`](Self::lookup).
    pub async fn forget(&self, tenant: TenantId, key: &str) -> Result<Forget, OperatorError> {
        let record = self.record_key(tenant, key)?;
        Ok(self.store.forget(&record, false).await?)
    }

    /// Forgets the record of `key` even while a request holds it: for a key whose holder is
    /// known to be dead (its server crashed and the lease is long), never for a slow request.
    ///
    /// The holder, if it is in fact alive, runs on: its response is not stored (its `complete`
    /// fails), and a retry may run the handler a second time meanwhile.
    ///
    /// # Errors
    ///
    /// As [`lookup`](Self::lookup).
    pub async fn forget_in_flight(
        &self,
        tenant: TenantId,
        key: &str,
    ) -> Result<Forget, OperatorError> {
        let record = self.record_key(tenant, key)?;
        Ok(self.store.forget(&record, true).await?)
    }
}

fn record_key(tenant: TenantId, key: &str) -> Result<RecordKey, OperatorError> {
    match parse_value(key.as_bytes()) {
        Ok(key) => Ok(RecordKey::from_text(tenant, key)),
        Err(KeyError::Invalid(reason)) => Err(OperatorError::InvalidKey(reason)),
        Err(KeyError::Missing) => Err(OperatorError::InvalidKey("the key is empty")),
    }
}

/// What [`Operator::lookup`] found: a live record of (tenant, key).
///
/// Its [`Display`](fmt::Display) is one line for a support ticket; [`to_json`](Self::to_json)
/// is the same for an admin API. Neither shows the response's body or headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    tenant: TenantId,
    key: String,
    fingerprint: Fingerprint,
    state: RecordState,
}

impl KeyReport {
    /// The tenant scope as the store holds it: sealed with the tenant secret (the value in a
    /// Redis key or a PostgreSQL row), never the extractor's own id, which for the default
    /// tenant is a hash of a credential anyone could test guesses against. Not an id to pass
    /// back to [`Operator::lookup`] or [`Operator::forget`], which seal the id they are given.
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The key, unquoted.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// In flight (with its lease) or completed (with its status and expiry).
    pub fn state(&self) -> RecordState {
        self.state
    }

    /// Whether a request holds the key now.
    pub fn is_in_flight(&self) -> bool {
        matches!(self.state, RecordState::InFlight { .. })
    }

    /// The stored status of a completed record; `None` while in flight.
    pub fn status(&self) -> Option<StatusCode> {
        match self.state {
            RecordState::Completed { status, .. } => Some(status),
            _ => None,
        }
    }

    /// When the record stops binding the key: the end of the lease while in flight (unless the
    /// holder renews it), the end of the TTL once completed.
    pub fn expires_at(&self) -> SystemTime {
        match self.state {
            RecordState::InFlight { lease_until } => lease_until,
            RecordState::Completed { expires_at, .. } => expires_at,
        }
    }

    /// The fingerprint of the request the key is bound to.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The first 8 bytes of the fingerprint in hex: enough to tell whether two requests are the
    /// same one.
    pub fn fingerprint_prefix(&self) -> String {
        let hex = self.fingerprint.to_string();
        hex[..FINGERPRINT_PREFIX_BYTES * 2].to_owned()
    }

    /// The report as JSON:
    ///
    /// ```json
    /// {
    ///   "tenant": "5c1f…", "key": "8e03978e-…", "state": "completed",
    ///   "fingerprint": "a1b2c3d4e5f60718", "status": 201, "replayable": true,
    ///   "expires_at_unix_ms": 1767225600000, "expires_in_ms": 86399000
    /// }
    /// ```
    ///
    /// `status` and `replayable` are `null` while in flight; `expires_in_ms` counts from the
    /// local clock, and is 0 once past.
    pub fn to_json(&self) -> serde_json::Value {
        let (state, status, replayable) = match self.state {
            RecordState::InFlight { .. } => ("in_flight", None, None),
            RecordState::Completed {
                status, replayable, ..
            } => ("completed", Some(status.as_u16()), Some(replayable)),
        };
        let expires_at = self.expires_at();
        let unix_ms = expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        serde_json::json!({
            "tenant": self.tenant.to_string(),
            "key": self.key,
            "state": state,
            "fingerprint": self.fingerprint_prefix(),
            "status": status,
            "replayable": replayable,
            "expires_at_unix_ms": unix_ms,
            "expires_in_ms": remaining.as_millis(),
        })
    }
}

/// One line: `key … (tenant …): completed 201, expires in 86399 s, fingerprint …`.
impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tenant = self.tenant.to_string();
        write!(f, "key {:?} (tenant {}…): ", self.key, &tenant[..16])?;
        match self.state {
            RecordState::InFlight { .. } => f.write_str("in flight")?,
            RecordState::Completed {
                status, replayable, ..
            } => {
                write!(f, "completed {}", status.as_u16())?;
                if !replayable {
                    f.write_str(" (response not stored)")?;
                }
            }
        }
        let remaining = self
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        write!(
            f,
            ", expires in {} s, fingerprint {}",
            remaining.as_secs(),
            self.fingerprint_prefix()
        )
    }
}

/// Why an [`Operator`] call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum OperatorError {
    /// The key is not one the layer accepts (empty, over 255 characters, not visible ASCII,
    /// several values): no record can have it. The text says why.
    InvalidKey(&'static str),
    /// The store failed, or does not support operator calls
    /// ([`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported)).
    Store(StoreError),
}

impl fmt::Display for OperatorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidKey(reason) => write!(f, "invalid idempotency key: {reason}"),
            Self::Store(err) => write!(f, "store error: {err}"),
        }
    }
}

impl std::error::Error for OperatorError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidKey(_) => None,
            Self::Store(err) => Some(err),
        }
    }
}

impl From<StoreError> for OperatorError {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: RecordState) -> KeyReport {
        KeyReport {
            tenant: TenantId::hashed("t"),
            key: "k-1".to_owned(),
            fingerprint: Fingerprint::from_bytes([0xab; 32]),
            state,
        }
    }

    #[test]
    fn keys_are_validated_and_unquoted_as_the_layer_does() {
        let tenant = TenantId::shared();
        assert_eq!(record_key(tenant, "\"abc\"").unwrap().key(), "abc");
        assert_eq!(record_key(tenant, "abc").unwrap().key(), "abc");
        for bad in ["", "a b", "a,b", &"k".repeat(256), "ключ"] {
            assert!(
                matches!(record_key(tenant, bad), Err(OperatorError::InvalidKey(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn completed_report() {
        let expires_at = SystemTime::now() + Duration::from_secs(3600);
        let report = report(RecordState::Completed {
            status: StatusCode::CREATED,
            replayable: true,
            expires_at,
        });
        assert!(!report.is_in_flight());
        assert_eq!(report.status(), Some(StatusCode::CREATED));
        assert_eq!(report.expires_at(), expires_at);
        assert_eq!(report.fingerprint_prefix(), "abababababababab");
        let json = report.to_json();
        assert_eq!(json["state"], "completed");
        assert_eq!(json["status"], 201);
        assert_eq!(json["replayable"], true);
        assert_eq!(json["key"], "k-1");
        assert_eq!(json["fingerprint"], "abababababababab");
        let remaining = json["expires_in_ms"].as_u64().unwrap();
        assert!((3_590_000..=3_600_000).contains(&remaining), "{remaining}");
        let line = report.to_string();
        assert!(line.starts_with("key \"k-1\" (tenant "), "{line}");
        assert!(line.contains("completed 201, expires in 35"), "{line}");
        assert!(line.ends_with("fingerprint abababababababab"), "{line}");
    }

    #[test]
    fn in_flight_report() {
        let report = report(RecordState::InFlight {
            lease_until: SystemTime::now() - Duration::from_secs(1),
        });
        assert!(report.is_in_flight());
        assert_eq!(report.status(), None);
        let json = report.to_json();
        assert_eq!(json["state"], "in_flight");
        assert!(json["status"].is_null());
        assert!(json["replayable"].is_null());
        assert_eq!(json["expires_in_ms"], 0);
        assert!(report.to_string().contains("in flight, expires in 0 s"));
    }

    #[test]
    fn errors_keep_their_source() {
        let err = OperatorError::from(StoreError::unsupported("lookup"));
        assert!(std::error::Error::source(&err).is_some());
        assert!(err.to_string().starts_with("store error: "));
        let err = OperatorError::InvalidKey("the key is empty");
        assert_eq!(err.to_string(), "invalid idempotency key: the key is empty");
    }
}
