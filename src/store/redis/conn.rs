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
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<i64> {
        let mut wait = ::redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(super::record::millis(timeout).as_bytes());
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

/// `name script 1 key args...`, its buffers sized up front: built argument by argument, a
/// command grows them a reallocation at a time.
fn script_call(name: &str, script: &str, key: &str, args: &[&[u8]]) -> Cmd {
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
        let call = super::script_call("EVALSHA", "0123abcd", "idempotency:{t:k}", &args);
        assert_eq!(call.get_packed_command(), expected.get_packed_command());
    }
}
