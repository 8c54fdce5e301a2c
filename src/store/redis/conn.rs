//! The store's connection: one Redis node, or a Redis Cluster, made again when it stops
//! answering.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Client, Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use arc_swap::ArcSwap;

use super::record::Lua;

/// A connection that carries every call of a store and its clones.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis server, through a reconnecting multiplexed connection.
    Node(Arc<Shared<NodeClient>>),
    /// A Redis Cluster: a multiplexed connection per node, commands routed by their key's slot,
    /// `MOVED` and `ASK` followed, the slot map refreshed after a failover.
    Cluster(Arc<Shared<ClusterClient>>),
}

/// What a connection is made from, and when it must be made again.
pub(super) trait Connect: Clone + Send + Sync + 'static {
    /// The connection: cheap to clone, every clone on the same sockets.
    type Conn: Clone + Send + Sync + 'static;

    /// A new connection.
    fn connect(&self) -> impl Future<Output = RedisResult<Self::Conn>> + Send;

    /// Whether a call that failed with `err` calls for a new connection.
    fn lost(err: &RedisError) -> bool;
}

/// The client and settings of one node's connection manager.
#[derive(Clone)]
pub(super) struct NodeClient {
    client: Client,
    config: ConnectionManagerConfig,
}

impl NodeClient {
    pub(super) fn new(client: Client, config: ConnectionManagerConfig) -> Self {
        Self { client, config }
    }
}

impl Connect for NodeClient {
    type Conn = ConnectionManager;

    fn connect(&self) -> impl Future<Output = RedisResult<ConnectionManager>> + Send {
        ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
    }

    /// A manager reconnects when a call finds its connection closed, but not when a call times
    /// out on a connection that stopped answering and stays open (its network path lost, the
    /// old endpoint of a failover): every later call would time out, for as long as TCP kept it
    /// open. Nor when the new connection itself is refused with anything but an I/O error (its
    /// `AUTH` refused while a password was being rotated, a server still loading): it would
    /// answer that error to every call, for good. Nor when the server it is connected to was
    /// made a replica (`READONLY`) while the URL now leads to the new primary (a DNS name or a
    /// proxy that follows it): it would keep the demoted server, and the leases of the runs
    /// under way would lapse.
    fn lost(err: &RedisError) -> bool {
        let demoted = err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        err.is_timeout() || (!err.is_io_error() && (err.is_unrecoverable_error() || demoted))
    }
}

impl Connect for ClusterClient {
    type Conn = ClusterConnection;

    fn connect(&self) -> impl Future<Output = RedisResult<ClusterConnection>> + Send {
        self.get_async_connection()
    }

    /// The cluster's client reconnects a node's connection that closed, but retries a call that
    /// timed out on the same connection: one that stopped answering and stays open would time
    /// out every call to that node, for as long as TCP kept it open.
    fn lost(err: &RedisError) -> bool {
        err.is_timeout()
    }
}

/// The connection every call of a store and its clones shares, and what it takes to make a new
/// one.
///
/// A call whose connection may have stopped answering (it timed out, or was dropped before its
/// answer came: the store's timeout, a request gone) or that met an error [`Connect::lost`]
/// names has a new connection made in the background (one at a time, at most one a second),
/// which takes the old one's place once it is connected: the calls after it, a live handler's
/// next renewal among them, go out on the new one. The calls under way on the old one end as
/// they would have.
pub(super) struct Shared<R: Connect> {
    current: ArcSwap<Current<R::Conn>>,
    /// What the connection was made from, when the store made it: a connection of the
    /// application's own is kept as it is.
    remake: Option<R>,
    /// Whether a new connection is being made (or was, less than a second ago).
    remaking: Arc<AtomicBool>,
}

/// The connection in use, and how many connections it replaced.
struct Current<C> {
    conn: C,
    generation: u64,
}

impl<R: Connect> Shared<R> {
    pub(super) fn new(conn: R::Conn, remake: Option<R>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Current {
                conn,
                generation: 0,
            }),
            remake,
            remaking: Arc::default(),
        })
    }

    /// The connection for one call, and the call's guard.
    fn lend(self: &Arc<Self>) -> (R::Conn, Call<'_, R>) {
        let current = self.current.load();
        let call = Call {
            shared: self,
            generation: current.generation,
            answered: false,
        };
        (current.conn.clone(), call)
    }

    /// Makes a new connection in the background to replace the one of `generation`, unless it
    /// was replaced already or another is being made.
    fn replace(self: &Arc<Self>, generation: u64) {
        let Some(remake) = &self.remake else {
            return;
        };
        if self.current.load().generation != generation {
            return;
        }
        // A call dropped outside a runtime (the runtime shutting down) has nothing to run it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.remaking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (shared, remake) = (Arc::downgrade(self), remake.clone());
        let remaking = self.remaking.clone();
        runtime.spawn(async move {
            if let Ok(conn) = remake.connect().await
                && let Some(shared) = shared.upgrade()
            {
                let generation = generation + 1;
                shared.current.store(Arc::new(Current { conn, generation }));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            remaking.store(false, Ordering::Release);
        });
    }
}

/// One call on the shared connection, from its start to its answer. Dropped before it was
/// [`settle`](Self::settle)d, or settled with an error [`Connect::lost`] names, it has the
/// connection replaced.
struct Call<'a, R: Connect> {
    shared: &'a Arc<Shared<R>>,
    generation: u64,
    answered: bool,
}

impl<R: Connect> Call<'_, R> {
    /// The call's answer, passed on.
    fn settle<T>(mut self, result: RedisResult<T>) -> RedisResult<T> {
        self.answered = !matches!(&result, Err(err) if R::lost(err));
        result
    }
}

impl<R: Connect> Drop for Call<'_, R> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.replace(self.generation);
        }
    }
}

impl Conn {
    /// Whether a call that met a dropped connection is worth running again here: one node's
    /// connection manager reconnects when a call finds its connection gone (the server
    /// restarted, closed it when idle, or killed it), and only then; the cluster's client
    /// retries such calls itself.
    pub(super) fn is_node(&self) -> bool {
        matches!(self, Self::Node(_))
    }

    async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::Node(node) => {
                let (mut conn, call) = node.lend();
                call.settle(cmd.query_async(&mut conn).await)
            }
            Self::Cluster(cluster) => {
                let (mut conn, call) = cluster.lend();
                call.settle(cmd.query_async(&mut conn).await)
            }
        }
    }

    /// Runs `script` on the key `key` by its SHA-1 (`EVALSHA`). A node that does not know the
    /// script (it restarted, failed over, or ran `SCRIPT FLUSH`) answers `NOSCRIPT`: the script
    /// then runs from its source (`EVAL`), routed by the same key, which also caches it on that
    /// node for the next calls.
    pub(super) async fn run(&self, script: &Lua, key: &[u8], args: &[&[u8]]) -> RedisResult<Value> {
        match self
            .query(&script_call("EVALSHA", &script.sha1, key, args))
            .await
        {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let eval = script_call("EVAL", &script.source, key, args);
                self.query(&eval).await
            }
            other => other,
        }
    }

    /// `WAIT replicas timeout` on the node that holds `key`, through the connection that carried
    /// the write: the number of replicas that acknowledged every write sent on it so far.
    pub(super) async fn wait(
        &self,
        key: &[u8],
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<i64> {
        let mut wait = ::redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(super::record::millis(timeout).as_bytes());
        let reply = match self {
            Self::Node(node) => {
                let (mut conn, call) = node.lend();
                call.settle(wait.query_async(&mut conn).await)?
            }
            Self::Cluster(cluster) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let (mut conn, call) = cluster.lend();
                call.settle(conn.route_command(wait, routing).await)?
            }
        };
        match reply {
            Value::Int(acknowledged) => Ok(acknowledged),
            other => Err(::redis::RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "WAIT answered something else than an integer",
                format!("{other:?}"),
            ))),
        }
    }

    /// Loads every script, on the node or on every primary of the cluster.
    pub(super) async fn load(&self, scripts: &[&Lua]) -> RedisResult<()> {
        for script in scripts {
            let mut load = ::redis::cmd("SCRIPT");
            load.arg("LOAD").arg(&script.source);
            self.query(&load).await?;
        }
        Ok(())
    }

    /// `PEXPIRE key 1` on a key that does not exist: nothing on a primary, `READONLY` on a
    /// replica (a write command is refused there before it looks at its key).
    pub(super) async fn check_writable(&self, key: &str) -> RedisResult<()> {
        let mut pexpire = ::redis::cmd("PEXPIRE");
        pexpire.arg(key).arg(1);
        self.query(&pexpire).await.map(drop)
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// How many times the store's connection was replaced so far: the same count before a write
    /// and after its [`wait`](Self::wait) says that both went out on one connection.
    pub(super) fn generation(&self) -> u64 {
        match self {
            Self::Node(node) => node.current.load().generation,
            Self::Cluster(cluster) => cluster.current.load().generation,
        }
    }
}

/// `name script 1 key args...`, its buffers sized up front: built argument by argument, a
/// command grows them a reallocation at a time.
fn script_call(name: &str, script: &str, key: &[u8], args: &[&[u8]]) -> Cmd {
    let data =
        name.len() + script.len() + 1 + key.len() + args.iter().map(|a| a.len()).sum::<usize>();
    let mut cmd = Cmd::with_capacity(4 + args.len(), data);
    cmd.arg(name).arg(script).arg(1).arg(key).arg(args);
    cmd
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_script_call_packs_as_one_built_argument_by_argument() {
        let args: [&[u8]; 3] = [b"fingerprint", b"", b"30000"];
        let mut expected = ::redis::cmd("EVALSHA");
        expected
            .arg("0123abcd")
            .arg(1)
            .arg("idempotency:{t:k}")
            .arg(&args[..]);
        let call = super::script_call("EVALSHA", "0123abcd", b"idempotency:{t:k}", &args);
        assert_eq!(call.get_packed_command(), expected.get_packed_command());
    }
}
