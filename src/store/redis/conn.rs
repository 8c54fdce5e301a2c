//! The store's connection: one Redis node, or a Redis Cluster.

use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

use super::record::Lua;

/// A connection that carries every call of a store and its clones.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis server, through a reconnecting multiplexed connection.
    Node(ConnectionManager),
    /// A Redis Cluster: a multiplexed connection per node, commands routed by their key's slot,
    /// `MOVED` and `ASK` followed, the slot map refreshed after a failover.
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::Node(conn) => cmd.query_async(&mut conn.clone()).await,
            Self::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
        }
    }

    /// Runs `script` on the key `key` by its SHA-1 (`EVALSHA`). A node that does not know the
    /// script (it restarted, failed over, or ran `SCRIPT FLUSH`) answers `NOSCRIPT`: the script
    /// then runs from its source (`EVAL`), routed by the same key, which also caches it on that
    /// node for the next calls.
    pub(super) async fn run(&self, script: &Lua, key: &str, args: &[&[u8]]) -> RedisResult<Value> {
        let mut evalsha = ::redis::cmd("EVALSHA");
        evalsha.arg(&script.sha1).arg(1).arg(key).arg(args);
        match self.query(&evalsha).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let mut eval = ::redis::cmd("EVAL");
                eval.arg(&script.source).arg(1).arg(key).arg(args);
                self.query(&eval).await
            }
            other => other,
        }
    }

    /// `WAIT replicas timeout` on the node that holds `key`, through the connection that carried
    /// the write: the number of replicas that acknowledged every write sent on it so far.
    pub(super) async fn wait(
        &self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<i64> {
        let mut wait = ::redis::cmd("WAIT");
        wait.arg(replicas).arg(super::record::millis(timeout));
        let reply = match self {
            Self::Node(conn) => wait.query_async(&mut conn.clone()).await?,
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

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}
