//! [`RedisStoreBuilder`]: a [`RedisStore`]'s settings, checked once, when the store is made.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::cluster_async::ClusterConnection;

use super::conn::{Conn, Shared};
use super::{DEFAULT_PREFIX, RedisStore, ReplicaWait, checked_prefix};
use crate::store::{IdempotencyStore, RecordKey, StoreError};
use crate::tenant::TenantId;

/// The settings of a [`RedisStore`], from [`RedisStore::builder`]: set them, then make the store
/// by connecting ([`connect`](Self::connect), [`connect_cluster`](Self::connect_cluster)), over
/// a connection of yours ([`build`](Self::build), [`build_cluster`](Self::build_cluster)), or
/// over another store's connection ([`share`](Self::share)). Once made, a store's settings do
/// not change.
///
/// # Panics
///
/// Every way of making the store checks the settings first, and panics with a clear message
/// when the prefix contains `{` or `}`, or the replica wait asks for 0 replicas or a zero
/// timeout.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    replica_wait: Option<(u32, Duration)>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            replica_wait: None,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every record's Redis key. Default: `idempotency:`. Every server of a
    /// fleet must use the same one.
    ///
    /// A prefix that contains `{` or `}` is refused when the store is made (see
    /// [`RedisStoreBuilder`]'s panics): the prefix would then hold the hash tag, and on a
    /// cluster every record would land in one slot.
    ///
    /// ```
    /// let builder = tower_idempotency::RedisStore::builder().prefix("payments-api:idem:");
    /// # let _ = builder;
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Makes every write wait until `replicas` replicas have it (`WAIT replicas timeout`), for
    /// at most `timeout`. Off by default. See [Failover and the replica
    /// wait](RedisStore#failover-and-the-replica-wait) for what it protects against.
    ///
    /// - `begin`: when it wrote an in-flight record and fewer replicas acknowledged it in
    ///   time, it releases that record again (so that the client's retry is not held off by a
    ///   record whose handler never ran; if the release fails too, the record's lease ends it)
    ///   and fails with [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable): the layer answers `503` and the
    ///   handler does not run. Answers that write nothing (in flight, replay, mismatch) do not
    ///   wait.
    /// - `complete`: the record stays completed on the primary, and the call fails with
    ///   [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable); the layer still returns the handler's response, and
    ///   reports the failure.
    /// - `forget`: the record is removed on the primary, and the call fails the same way.
    /// - `renew` and `release` do not wait: a lost renewal or release leaves a record that its
    ///   lease ends.
    ///
    /// `WAIT` counts the writes of the connection it is sent on: when the store replaced its
    /// connection between a write and its wait (one that stopped answering), the wait cannot
    /// vouch for the write, and the call fails as if too few replicas acknowledged it.
    ///
    /// Keep `timeout` well under the layer's store timeout (2 s by default) and under the
    /// connection's reply timeout (500 ms with [`connect`](RedisStore::connect) and
    /// [`connect_cluster`](RedisStore::connect_cluster)), which cuts a longer wait short: 10 to
    /// 100 ms is typical. Redis answers a connection's commands in order, so while a `WAIT` is
    /// pending, the calls queued behind it on the same connection wait too; with healthy
    /// replicas that is about one round trip to a replica, and with a replica down it is up to
    /// `timeout`, for every call to that primary.
    ///
    /// `replicas` of 0 and a zero `timeout` (`WAIT` with a zero timeout blocks forever) are
    /// refused when the store is made (see [`RedisStoreBuilder`]'s panics).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = tower_idempotency::RedisStore::builder().replica_wait(1, Duration::from_millis(50));
    /// # let _ = builder;
    /// ```
    pub fn replica_wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_wait = Some((replicas, timeout));
        self
    }

    /// Connects to the Redis at `url`, as [`RedisStore::connect`], with these settings.
    ///
    /// # Errors
    ///
    /// As [`RedisStore::connect`].
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        let (prefix, wait) = self.checked();
        let conn = RedisStore::open(url).await?;
        let store = RedisStore::with(conn, prefix, wait);
        // A call as the layer makes them, on a key under the prefix, which finds nothing, and a
        // write that changes nothing: a server that would refuse every call (the user's ACL, a
        // replica) is told at start.
        let probe = RecordKey::new(TenantId::shared(), "tower-idempotency:connect");
        store.lookup(&probe).await?;
        // Under the prefix, but never a record's key (those have a `{` right after it): the
        // write cannot touch one.
        let key = format!("{}connect-check", store.prefix());
        store
            .conn
            .check_writable(&key)
            .await
            .map_err(super::redis_error)?;
        Ok(store)
    }

    /// Connects to the Redis Cluster of `nodes`, as [`RedisStore::connect_cluster`], with these
    /// settings.
    ///
    /// # Errors
    ///
    /// As [`RedisStore::connect_cluster`].
    pub async fn connect_cluster<I>(self, nodes: I) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let (prefix, wait) = self.checked();
        let conn = RedisStore::open_cluster(nodes).await?;
        Ok(RedisStore::with(conn, prefix, wait))
    }

    /// A store over an existing connection manager (one Redis server), as [`RedisStore::new`].
    pub fn build(self, conn: ConnectionManager) -> RedisStore {
        let (prefix, wait) = self.checked();
        RedisStore::with(Conn::Node(Shared::new(conn, None)), prefix, wait)
    }

    /// A store over an existing Redis Cluster connection, as [`RedisStore::from_cluster`].
    pub fn build_cluster(self, conn: ClusterConnection) -> RedisStore {
        let (prefix, wait) = self.checked();
        RedisStore::with(Conn::Cluster(Shared::new(conn, None)), prefix, wait)
    }

    /// A store over `other`'s connection, with these settings: for instance two APIs of one
    /// process, each with a prefix of its own, on one Redis connection.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// use tower_idempotency::RedisStore;
    ///
    /// let payments = RedisStore::builder().prefix("payments:").connect("redis://127.0.0.1").await?;
    /// let orders = RedisStore::builder().prefix("orders:").share(&payments);
    /// # let _ = orders;
    /// # Ok(())
    /// # }
    /// ```
    pub fn share(self, other: &RedisStore) -> RedisStore {
        let (prefix, wait) = self.checked();
        RedisStore::with(other.conn.clone(), prefix, wait)
    }

    /// The settings, checked: the one place they are.
    fn checked(self) -> (Arc<str>, Option<ReplicaWait>) {
        let prefix = checked_prefix(self.prefix);
        let wait = self
            .replica_wait
            .map(|(replicas, timeout)| ReplicaWait::new(replicas, timeout));
        (prefix, wait)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RedisStoreBuilder;

    #[test]
    fn settings_are_checked_when_the_store_is_made() {
        let (prefix, wait) = RedisStoreBuilder::default().checked();
        assert_eq!((&*prefix, wait.is_none()), ("idempotency:", true));
        let (prefix, wait) = RedisStoreBuilder::default()
            .prefix("api:")
            .replica_wait(2, Duration::from_millis(20))
            .checked();
        let wait = wait.unwrap();
        assert_eq!(
            (&*prefix, wait.replicas, wait.timeout),
            ("api:", 2, Duration::from_millis(20))
        );
        for bad in [
            RedisStoreBuilder::default().prefix("api{1}:"),
            RedisStoreBuilder::default().replica_wait(0, Duration::from_millis(20)),
            RedisStoreBuilder::default().replica_wait(1, Duration::ZERO),
        ] {
            assert!(std::panic::catch_unwind(|| bad.checked()).is_err());
        }
    }
}
