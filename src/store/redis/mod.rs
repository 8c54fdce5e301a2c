//! [`RedisStore`]: a store shared by every server of a fleet, on one Redis or a Redis Cluster.

mod builder;
mod conn;
mod record;
mod store;

pub use builder::RedisStoreBuilder;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, ErrorKind, RedisError};

use self::conn::{Conn, NodeClient, Shared};
use super::{RecordKey, StoreError, StoreErrorKind};

/// The default key prefix.
const DEFAULT_PREFIX: &str = "idempotency:";

/// An [`IdempotencyStore`](crate::IdempotencyStore) on Redis, shared by every server of a
/// fleet: one Redis server ([`connect`](Self::connect)) or a Redis Cluster
/// ([`connect_cluster`](Self::connect_cluster)).
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # How records are kept
///
/// Each record is one Redis string at `<prefix>{<tenant hex>:<key>}`, for example
/// `idempotency:{4f3c…9a:8e03978e-40d5-43e8}`. The prefix (default `idempotency:`) and the
/// record key are the same on every server, so a fleet shares one truth. The braces are a hash
/// tag, and each script touches that one key: on a Redis Cluster, a record lives in one slot,
/// and records spread over every primary. The layout is the same on one node and on a cluster.
///
/// The value is a version byte (`1`), a state byte (`f` in flight, `c` completed), the
/// request's fingerprint (32 bytes), the holder's lock token (16 bytes, big-endian) and, once
/// completed, the response as [`StoredResponse::encode`](crate::StoredResponse::encode)
/// writes it. Binary bodies round-trip exactly.
///
/// Time is the server's: an in-flight record's lease is the key's expiry (`PX`), so Redis
/// removes a dead holder's record by itself and the next request takes the key over; a
/// completed record's expiry is the TTL, counted from completion. No clock of the application
/// servers is involved.
///
/// Every call is one Lua script, which Redis runs atomically: `begin` decides (acquired, in
/// flight, completed, mismatch) and writes in one step; `renew`, `complete` and `release` check
/// the lock token inside the script, answering [`StoreErrorKind::LeaseLost`] when it no longer
/// holds the record; `lookup` reads, and `forget` removes, in one step. A request is one round
/// trip per store call: `begin`, then `complete` (or `release`). The scripts are sent by their
/// SHA-1 (`EVALSHA`); a node that does not know one (after a restart, a failover or `SCRIPT
/// FLUSH`) answers `NOSCRIPT`, and that call runs the script from its source (`EVAL`) on the
/// same node, which keeps it for the next calls.
///
/// # Connections
///
/// On one server, the store talks through the `redis` crate's Tokio [`ConnectionManager`]: one
/// multiplexed connection shared by every request (cloning the store is cheap and shares it).
/// Redis runs commands one at a time anyway, so one pipelined connection carries every
/// concurrent request without a pool to size; and it reconnects by itself when the connection
/// drops, so a Redis restart needs no action from the application. While Redis is down, store
/// calls fail with [`StoreErrorKind::Unavailable`] (the layer answers `503` with `Retry-After`,
/// and its store timeout bounds how long a request waits); once Redis is back, the next calls
/// succeed again, without rebuilding the store. [`connect`](Self::connect) retries a lost
/// connection with an exponential backoff of at most one second, and keeps the `redis` crate's
/// timeouts (1 s to connect, 500 ms per response); for other settings (timeouts, TLS, RESP3),
/// build your own manager and use [`new`](Self::new).
///
/// A connection can also stop answering without closing (its network path lost, a firewall
/// dropping its packets, the old endpoint of a failover), and the manager would keep it: every
/// call would time out for as long as TCP kept it open, and a live handler's lease renewals
/// with them, until another server took its key over and ran it again. So a call that timed
/// out, or that was dropped before its answer came (the layer's store timeout, a request gone),
/// has a new connection made in the background (one at a time, at most one a second); once it
/// is connected it takes the old one's place, and the calls after it, the next renewal among
/// them, go out on it. The calls under way on the old connection end as they would have.
///
/// On a cluster, see [`connect_cluster`](Self::connect_cluster).
///
/// # Failover and the replica wait
///
/// Redis replicates asynchronously: a primary acknowledges a write before its replicas have
/// it. When a primary dies and a replica is promoted, the writes of the last moments before the
/// crash may be lost: typically under a millisecond of writes on a healthy local network (at
/// 5,000 requests per second, a handful of records), and everything the replica lagged behind
/// when the link was slow. A lost in-flight record lets a retry run the handler while the first
/// run is still going; a lost completion leaves the record in flight on the new primary until
/// its lease runs out (30 s by default), after which a retry runs the handler again.
///
/// [`replica_wait`](Self::replica_wait) closes that window: `begin` (when it writes) and
/// `complete` return only once `replicas` replicas acknowledged the write (`WAIT`). With one
/// replica per primary and `replica_wait(1, ..)`, the death of a primary loses no record that
/// the store acknowledged: every acknowledged record is on the replica that takes over. Two
/// failures at once (the primary and that replica) can still lose records; Redis does not
/// become a consensus system. The cost is one more round trip on each write (`begin` that
/// acquires, `complete`, `forget`), about one network round trip between the primary and its
/// replica.
///
/// # Operating Redis
///
/// Give idempotency records a Redis whose eviction policy never evicts them
/// (`maxmemory-policy noeviction`, or no `maxmemory`): every record carries an expiry, so a
/// `volatile-*` policy could evict a live record under memory pressure and let a retry run the
/// handler twice (an `allkeys-*` policy, any record). A Redis that is full under `noeviction`
/// is a full store: a new key gets `503` (even failing open); a response that cannot be stored
/// keeps its record in flight for the TTL (retries get `409`, never a second run) while the
/// completion is tried again. With persistence off, a Redis restart forgets every record.
///
/// On one server, a call that finds its connection dropped (a restart, an idle timeout of the
/// server or of a proxy, `CLIENT KILL`) runs once more on a new connection: every call can run
/// twice safely. A new connection refused by the server (its `AUTH` during a password rotation),
/// and one that stopped answering (see [Connections](#connections)), is made again in the
/// background, at most once a second, for a store made by [`connect`](Self::connect) or
/// [`connect_cluster`](Self::connect_cluster) (one made with [`new`](Self::new) or
/// [`from_cluster`](Self::from_cluster) from a connection of yours keeps that connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    replica_wait: Option<ReplicaWait>,
}

/// How many replicas must acknowledge a write, and for how long to wait for them.
#[derive(Debug, Clone, Copy)]
struct ReplicaWait {
    replicas: u32,
    timeout: Duration,
}

impl ReplicaWait {
    fn new(replicas: u32, timeout: Duration) -> Self {
        assert!(
            replicas > 0,
            "RedisStore::replica_wait: replicas must be at least 1"
        );
        assert!(
            !timeout.is_zero(),
            "RedisStore::replica_wait: the timeout must be longer than zero"
        );
        Self { replicas, timeout }
    }
}

fn checked_prefix(prefix: String) -> Arc<str> {
    assert!(
        !prefix.contains(['{', '}']),
        "RedisStore::prefix: {prefix:?} contains a brace; the record key's hash tag must be the \
         first one"
    );
    Arc::from(prefix)
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` with the `redis` crate's TLS features), loads the store's scripts, and runs
    /// one of them (a lookup of a key under the prefix, which finds nothing) to check that the
    /// server takes the store's calls.
    ///
    /// Fails with [`StoreErrorKind::Other`] when the URL is invalid, and with
    /// [`StoreErrorKind::Unavailable`] when the server cannot be reached or refuses that call:
    /// an ACL user without the store's commands or its prefix's keys (`NOPERM`; see README's
    /// Redis section for the ones it needs), a server that is a replica (`READONLY`), one still
    /// loading its data.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Settings for a store, built once: the key prefix and the replica wait, checked when the
    /// store is made ([`RedisStoreBuilder`]).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// use std::time::Duration;
    /// use tower_idempotency::RedisStore;
    ///
    /// let store = RedisStore::builder()
    ///     .prefix("payments-api:idem:")
    ///     .replica_wait(1, Duration::from_millis(50))
    ///     .connect("redis://127.0.0.1:6379")
    ///     .await?;
    /// assert_eq!(store.prefix(), "payments-api:idem:");
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    async fn open(url: &str) -> Result<Conn, StoreError> {
        let client =
            Client::open(url).map_err(|err| StoreError::new(StoreErrorKind::Other, err))?;
        let config = ConnectionManagerConfig::new().set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(redis_error)?;
        let conn = Conn::Node(Shared::new(conn, Some(NodeClient::new(client, config))));
        // So that first calls need no `EVAL`; a user who may not `SCRIPT LOAD` (or a server
        // where `SCRIPT` is renamed) runs each script by `EVAL` once instead.
        let _ = conn.load(&record::all()).await;
        Ok(conn)
    }

    /// Connects to the Redis Cluster that `nodes` belong to: the URLs of one or more of its
    /// nodes (`redis://host:port`, all with the same credentials), as `&str` or `String`. The
    /// client asks them for the cluster's slot map, then talks to every primary directly.
    ///
    /// The store is the same type, with the same record layout, as on one server. Each record
    /// lives in the slot of its hash tag; its calls go to that slot's primary (replicas are
    /// never read, so a replay never sees a stale record). During a resharding, `MOVED` and
    /// `ASK` redirections are followed. When a primary fails, the calls on its slots fail
    /// (`503`) until the cluster promotes one of its replicas, after `cluster-node-timeout`;
    /// the client then refreshes its slot map and the store works again by itself. Each call
    /// gives up after 2 s, retries and redirections included (the layer's store timeout, 2 s by
    /// default, usually answers first); connecting to a node times out after 1 s and a reply
    /// after 500 ms. The client reconnects a node's connection that closed, but retries a call
    /// that timed out on the same connection: a call that timed out, or that was dropped before
    /// its answer came, has the store's cluster connection made again in the background, from
    /// the same client (one at a time, at most one a second), so that a node connection that
    /// stopped answering without closing costs a call or two, not every call to that node. For
    /// other settings (TLS, credentials, timeouts), build your own [`ClusterClient`] and use
    /// [`from_cluster`](Self::from_cluster) (the store then keeps that connection as it is).
    ///
    /// The scripts are loaded on every primary when it connects; a node that lacks them later
    /// (a promoted replica, a restarted node) gets them on its first call.
    ///
    /// Fails with [`StoreErrorKind::Other`] when `nodes` is empty or a URL is invalid, and
    /// with [`StoreErrorKind::Unavailable`] when no node can be reached.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// use tower_idempotency::RedisStore;
    ///
    /// let store = RedisStore::connect_cluster([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ])
    /// .await?;
    ///
    /// // Or from a list read from the environment:
    /// let nodes: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
    ///     .unwrap_or_default()
    ///     .split(',')
    ///     .map(str::to_owned)
    ///     .collect();
    /// let store = RedisStore::connect_cluster(nodes).await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster<I>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Self::builder().connect_cluster(nodes).await
    }

    async fn open_cluster<I>(nodes: I) -> Result<Conn, StoreError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let nodes: Vec<String> = nodes
            .into_iter()
            .map(|node| node.as_ref().to_owned())
            .collect();
        if nodes.is_empty() {
            return Err(StoreError::msg(
                StoreErrorKind::Other,
                "connect_cluster needs the URL of at least one node",
            ));
        }
        let client = ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_millis(500))
            .overall_response_timeout(Some(Duration::from_secs(2)))
            .build()
            .map_err(|err| StoreError::new(StoreErrorKind::Other, err))?;
        let conn = client.get_async_connection().await.map_err(redis_error)?;
        let conn = Conn::Cluster(Shared::new(conn, Some(client)));
        // On every primary, so that first calls need no `EVAL`. A primary that is down now
        // gets the scripts on its first `NOSCRIPT`: starting during a failover is fine.
        let _ = conn.load(&record::all()).await;
        Ok(conn)
    }

    /// A store over an existing connection manager (one Redis server), with the default
    /// settings. The store keeps that manager: it makes no new one when the manager's connection
    /// is refused or stops answering (see [Connections](#connections)).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let manager = redis::aio::ConnectionManager::new(client).await?;
    /// let store = tower_idempotency::RedisStore::new(manager);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(conn: ConnectionManager) -> Self {
        Self::builder().build(conn)
    }

    /// A store over an existing Redis Cluster connection, with the default settings. Keep the
    /// client's default of reading from primaries only: a replica may not have a record yet. The
    /// store keeps that connection: it makes no new one when a node's connection stops answering
    /// (see [`connect_cluster`](Self::connect_cluster)).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let client = redis::cluster::ClusterClient::builder(["redis://10.0.0.1:6379"])
    ///     .username("api")
    ///     .password("secret")
    ///     .response_timeout(Duration::from_millis(200))
    ///     .build()?;
    /// let conn = client.get_async_connection().await?;
    /// let store = tower_idempotency::RedisStore::from_cluster(conn);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_cluster(conn: ClusterConnection) -> Self {
        Self::builder().build_cluster(conn)
    }

    fn with(conn: Conn, prefix: Arc<str>, replica_wait: Option<ReplicaWait>) -> Self {
        Self {
            conn,
            prefix,
            replica_wait,
        }
    }

    /// The prefix of every record's Redis key (`idempotency:` by default).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The replica wait, as (replicas, timeout); `None` when writes do not wait (the default).
    pub fn replica_wait(&self) -> Option<(u32, Duration)> {
        self.replica_wait.map(|wait| (wait.replicas, wait.timeout))
    }

    /// The Redis key of `key`'s record: `<prefix>{<tenant hex>:<key>}`, the whole record key
    /// as the hash tag (so every record has a slot of its own choosing). Redis ends a hash tag
    /// at the first `}`, so `%` and `}` in the key are percent-encoded (`%25`, `%7D`): no key
    /// can end the tag early and pin other records to its slot, and two keys never share a
    /// Redis key.
    pub(crate) fn redis_key(&self, key: &RecordKey) -> Vec<u8> {
        redis_key(&self.prefix, key)
    }

    /// `true` when the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.conn.is_cluster())
            .field("prefix", &self.prefix)
            .field("replica_wait", &self.replica_wait)
            .finish_non_exhaustive()
    }
}

/// See [`RedisStore::redis_key`]. Written as bytes (every call passes it to Redis as such), in
/// one buffer sized up front; a key without `%` or `}` (nearly every key) is copied whole.
fn redis_key(prefix: &str, key: &RecordKey) -> Vec<u8> {
    let raw = key.text().as_bytes();
    let escapes = raw.iter().filter(|&&b| b == b'%' || b == b'}').count();
    // The prefix, `{`, 64 hex digits, `:`, the key with its escapes, `}`.
    let mut out = Vec::with_capacity(prefix.len() + 67 + raw.len() + 2 * escapes);
    out.extend_from_slice(prefix.as_bytes());
    out.push(b'{');
    out.extend_from_slice(&crate::util::hex32(key.tenant().as_bytes()));
    out.push(b':');
    if escapes == 0 {
        out.extend_from_slice(raw);
    } else {
        for &byte in raw {
            match byte {
                b'%' => out.extend_from_slice(b"%25"),
                b'}' => out.extend_from_slice(b"%7D"),
                byte => out.push(byte),
            }
        }
    }
    out.push(b'}');
    out
}

/// Connection, I/O and server errors make the store unavailable; a server out of memory
/// (`maxmemory` reached under `noeviction`) is a full store, as a full `MemoryStore` (never
/// run past, even failing open); a reply the client could not read, or a key holding another
/// Redis type, is corrupt.
fn redis_error(err: RedisError) -> StoreError {
    let kind = match err.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreErrorKind::Corrupt,
        _ if err.code() == Some("WRONGTYPE") => StoreErrorKind::Corrupt,
        _ if err.code() == Some("OOM") => StoreErrorKind::CapacityExceeded,
        _ => StoreErrorKind::Unavailable,
    };
    StoreError::new(kind, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;

    #[test]
    fn redis_keys_are_stable_and_hash_tagged() {
        let key = RecordKey::new(TenantId::shared(), "a{b}:c%");
        let expected = format!("idempotency:{{{}:a{{b%7D:c%25}}", "0".repeat(64));
        // The key does not depend on the connection, only on the prefix and the record key.
        assert_eq!(redis_key(DEFAULT_PREFIX, &key), expected.as_bytes());
        let plain = RecordKey::new(TenantId::shared(), "order-42");
        assert_eq!(
            redis_key("p:", &plain),
            format!("p:{{{}:order-42}}", "0".repeat(64)).as_bytes()
        );
    }

    /// The hash tag is what Redis hashes: from the first `{` to the first `}` after it.
    fn hash_tag(redis_key: &str) -> &str {
        let open = redis_key.find('{').unwrap();
        let close = open + 1 + redis_key[open + 1..].find('}').unwrap();
        &redis_key[open + 1..close]
    }

    /// The key as the `fmt`-based form wrote it, character by character.
    #[test]
    fn redis_keys_escape_as_the_character_by_character_form() {
        let tenant = TenantId::hashed("t");
        for k in ["", "plain", "%", "}", "a%b}c", "%%}}", "é}ü%", "x%7D", "}{"] {
            let mut expected = format!("p:{{{tenant}:");
            for c in k.chars() {
                match c {
                    '%' => expected.push_str("%25"),
                    '}' => expected.push_str("%7D"),
                    c => expected.push(c),
                }
            }
            expected.push('}');
            let key = redis_key("p:", &RecordKey::new(tenant, k));
            assert_eq!(key, expected.as_bytes());
            assert_eq!(key.capacity(), key.len(), "sized up front");
        }
    }

    #[test]
    fn no_key_character_ends_the_hash_tag() {
        let tenant = TenantId::hashed("t");
        let keys = ["}", "}a", "}b", "a}", "%7D", "}}}", "{}", "%", "%25"];
        let mut tags = std::collections::HashSet::new();
        let mut redis_keys = std::collections::HashSet::new();
        for k in keys {
            let rk =
                String::from_utf8(redis_key(DEFAULT_PREFIX, &RecordKey::new(tenant, k))).unwrap();
            assert!(rk.ends_with('}'), "{rk}");
            assert_eq!(hash_tag(&rk).len(), rk.len() - DEFAULT_PREFIX.len() - 2);
            tags.insert(hash_tag(&rk).to_owned());
            redis_keys.insert(rk);
        }
        assert_eq!(tags.len(), keys.len(), "every key has a tag of its own");
        assert_eq!(redis_keys.len(), keys.len());
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(&*checked_prefix("api:idem:".into()), "api:idem:");
        assert_eq!(&*checked_prefix(String::new()), "");
        assert!(std::panic::catch_unwind(|| checked_prefix("api{1}:".into())).is_err());
        assert!(std::panic::catch_unwind(|| checked_prefix("api}".into())).is_err());

        let wait = ReplicaWait::new(2, Duration::from_millis(50));
        assert_eq!(
            (wait.replicas, wait.timeout),
            (2, Duration::from_millis(50))
        );
        assert!(std::panic::catch_unwind(|| ReplicaWait::new(0, Duration::from_secs(1))).is_err());
        assert!(std::panic::catch_unwind(|| ReplicaWait::new(1, Duration::ZERO)).is_err());
    }
}
