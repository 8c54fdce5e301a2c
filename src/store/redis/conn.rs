//! The store's connection: one Redis node, or a Redis Cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Client, Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

use super::record::Lua;

/// A connection that carries every call of a store and its clones.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis server, through a reconnecting multiplexed connection.
    Node(Arc<Node>),
    /// A Redis Cluster: a multiplexed connection per node, commands routed by their key's slot,
    /// `MOVED` and `ASK` followed, the slot map refreshed after a failover.
    Cluster(ClusterConnection),
}

/// One Redis server's connection manager, and what it takes to make a new one.
pub(super) struct Node {
    manager: RwLock<ConnectionManager>,
    /// The client and settings the manager was made from, when the store made it.
    remake: Option<(Client, ConnectionManagerConfig)>,
    /// Whether a new manager is being made (or was, less than a second ago).
    remaking: Arc<AtomicBool>,
}

impl Node {
    pub(super) fn new(
        manager: ConnectionManager,
        remake: Option<(Client, ConnectionManagerConfig)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            manager: RwLock::new(manager),
            remake,
            remaking: Arc::default(),
        })
    }

    fn manager(&self) -> ConnectionManager {
        let manager = self.manager.read().unwrap_or_else(PoisonError::into_inner);
        manager.clone()
    }

    /// A manager reconnects when a call fails on its connection, but not when the new
    /// connection itself is refused with anything but an I/O error (its `AUTH` refused while a
    /// password was being rotated, a server still loading): it would answer that error to every
    /// call, for good. Nor when the server it is connected to was made a replica (`READONLY`)
    /// while the URL now leads to the new primary (a DNS name or a proxy that follows it): it
    /// would keep the demoted server, and the leases of the runs under way would lapse. After
    /// such an error, a new manager is made in the background (one at a time, at most one a
    /// second), and takes the old one's place once it is connected.
    fn recover(self: &Arc<Self>, err: &RedisError) {
        let Some((client, config)) = &self.remake else {
            return;
        };
        let demoted = err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        if err.is_io_error() || !(err.is_unrecoverable_error() || demoted) {
            return;
        }
        if self.remaking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (node, client, config) = (Arc::downgrade(self), client.clone(), config.clone());
        let remaking = self.remaking.clone();
        tokio::spawn(async move {
            if let Ok(manager) = ConnectionManager::new_with_config(client, config).await
                && let Some(node) = node.upgrade()
            {
                *node.manager.write().unwrap_or_else(PoisonError::into_inner) = manager;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            remaking.store(false, Ordering::Release);
        });
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
                let result = cmd.query_async(&mut node.manager()).await;
                if let Err(err) = &result {
                    node.recover(err);
                }
                result
            }
            Self::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
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
            Self::Node(node) => wait.query_async(&mut node.manager()).await?,
            Self::Cluster(conn) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                conn.clone().route_command(wait, routing).await?
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
