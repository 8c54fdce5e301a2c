//! `RedisStore` when its connection stops answering without closing (a network path lost, a
//! firewall dropping packets, the old endpoint of a failover) while new connections to the
//! server work: a TCP proxy on 127.0.0.1 (`support::proxy`) freezes the connections open through
//! it, on one Redis server and on a Redis Cluster of the test's own whose nodes announce the
//! proxies' ports. A call that timed out, or that the store timeout dropped before its answer,
//! has the store's connection made again in the background; before, the connection manager and
//! the cluster's client kept the frozen connection, and every later call timed out.
//!
//! Every test here depends on timing (TIMING): calls are cut at a store timeout, and a lease of
//! 1.5 s must outlive a freeze.
//!
//! Run: `scripts/test-services cargo test --all-features --test redis_frozen`
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use support::cluster::{BUS, Node, binary, node_command};
use support::frozen::{assert_lease_kept, begins, line};
use support::proxy::{Proxy, host_port, through};
use support::server_url;
use tokio::net::TcpListener;
use tower_idempotency::RedisStore;

/// Whether the calls of `acquired` failed at most `failures` times, all first, and then never.
fn recovered(acquired: &[bool], failures: usize) -> bool {
    let first = acquired.iter().position(|a| *a);
    first.is_some_and(|first| first <= failures && acquired[first..].iter().all(|a| *a))
}

// ---------------------------------------------------------------------------------------------
// One node

/// One node, its connection frozen: the call the store timeout cuts (300 ms), or the one the
/// client's own reply timeout ends (500 ms, the calls cut at 1 s), has a new connection made in
/// the background, and the calls after it succeed (the fourth at the latest), on one new
/// connection or two. Without it, every later call timed out, for as long as TCP kept the
/// frozen connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_node_connection_that_stops_answering_is_replaced() {
    let Some(url) = server_url("REDIS_URL", "redis_node_connection_that_stops_answering") else {
        return;
    };
    let (mut report, mut every_time) = (Vec::new(), true);
    for (timeout, calls) in [(300, 20), (1000, 10)] {
        let proxy = Proxy::start(host_port(&url).to_owned()).await;
        let store = RedisStore::connect(&through(&url, &proxy)).await.unwrap();
        let timeout = Duration::from_millis(timeout);
        let before = begins(&store, 4, Duration::from_secs(5)).await;
        assert!(before.iter().all(|a| *a), "{before:?}");
        let frozen = proxy.freeze_those_open();
        let started = Instant::now();
        let after = begins(&store, calls, timeout).await;
        // A new connection or two, not one per call.
        every_time &= recovered(&after, 3) && proxy.opened() <= 3;
        report.push(format!(
            "cut at {timeout:?}: {} ({frozen} frozen, {} opened, {:?})",
            line(&after),
            proxy.opened(),
            started.elapsed()
        ));
    }
    assert!(
        every_time,
        "begins after the freeze (1 acquired, . failed), recovered after at most 3 on at most 2 new \
         connections: {report:#?}"
    );
}

/// Two servers on one Redis; A's connection freezes while its handler runs. The renewal the
/// store timeout cuts has the connection replaced, the next renewal goes out on the new one and
/// keeps the lease: B's retry gets `409` and the handler runs once. Without it, every renewal
/// timed out, the lease lapsed, and B ran the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_node_server_whose_connection_stops_answering_keeps_its_handlers_lease() {
    let Some(url) = server_url("REDIS_URL", "redis_node_keeps_its_handlers_lease") else {
        return;
    };
    let proxy = Proxy::start(host_port(&url).to_owned()).await;
    let a = RedisStore::connect(&through(&url, &proxy)).await.unwrap();
    let make_b = async || RedisStore::connect(&url).await.unwrap();
    let freeze = || {
        let _ = proxy.freeze_those_open();
    };
    assert_lease_kept(a, make_b, freeze, "on one node").await;
}

// ---------------------------------------------------------------------------------------------
// A Redis Cluster of the test's own, whose nodes announce proxies' ports

/// Three primaries, no replica; node i announces the port of proxy i (so the client, which
/// learns the nodes from `CLUSTER SLOTS`, talks to every node through its proxy); the cluster
/// bus is direct.
struct ProxiedCluster {
    _nodes: Vec<Node>,
    proxies: Vec<Proxy>,
}

impl ProxiedCluster {
    async fn start(test: &str) -> Option<Self> {
        let server = binary("REDIS_SERVER_BIN", test)?;
        let mut nodes = Vec::new();
        let mut proxies = Vec::new();
        let mut buses = Vec::new();
        for _ in 0..3 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let announced = listener.local_addr().unwrap().port().to_string();
            let node = Node::start(
                &server,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    BUS,
                    "--cluster-announce-ip",
                    "127.0.0.1",
                    "--cluster-announce-port",
                    &announced,
                    "--cluster-announce-bus-port",
                    BUS,
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-require-full-coverage",
                    "no",
                ],
            );
            proxies.push(Proxy::on(listener, format!("127.0.0.1:{}", node.port)));
            buses.push(node.bus.to_string());
            nodes.push(node);
        }
        let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
        for (node, (from, to)) in nodes.iter().zip(ranges) {
            node_command(&node.url(), &["CLUSTER", "ADDSLOTSRANGE", from, to])
                .await
                .unwrap();
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let port = node.port.to_string();
            node_command(
                &nodes[0].url(),
                &["CLUSTER", "MEET", "127.0.0.1", &port, bus],
            )
            .await
            .unwrap();
        }
        let ready = support::eventually(Duration::from_secs(30), async || {
            for node in &nodes {
                let info = node_command(&node.url(), &["CLUSTER", "INFO"]).await;
                if !info
                    .is_ok_and(|i| i.contains("cluster_state:ok") && i.contains("known_nodes:3"))
                {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(ready, "the proxied cluster did not become ready");
        // Every node's view of the others must carry the announced ports.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(Self {
            _nodes: nodes,
            proxies,
        })
    }

    fn urls(&self) -> Vec<String> {
        self.proxies
            .iter()
            .map(|p| format!("redis://127.0.0.1:{}", p.port()))
            .collect()
    }

    fn freeze_those_open(&self) -> usize {
        self.proxies.iter().map(Proxy::freeze_those_open).sum()
    }

    fn opened(&self) -> usize {
        self.proxies.iter().map(Proxy::opened).sum()
    }
}

/// A cluster whose node connections all freeze: the call the store timeout cuts (300 ms), or
/// the one the client's own timeouts end (the calls cut at 2.5 s, after a second freeze), has
/// the cluster connection made again in the background, from the same client, and the calls
/// after it succeed (the fourth at the latest). Without it, the client retried each call on the
/// same frozen node connection and never reconnected it: every later call timed out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_connection_that_stops_answering_is_replaced() {
    let test = "redis_cluster_connection_that_stops_answering_is_replaced";
    let Some(cluster) = ProxiedCluster::start(test).await else {
        return;
    };
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let before = begins(&store, 8, Duration::from_secs(5)).await;
    assert!(before.iter().all(|a| *a), "{before:?}");
    let (mut report, mut every_time) = (Vec::new(), true);
    for (timeout, calls) in [(300, 20), (2500, 6)] {
        let frozen = cluster.freeze_those_open();
        let started = Instant::now();
        let after = begins(&store, calls, Duration::from_millis(timeout)).await;
        every_time &= recovered(&after, 3);
        report.push(format!(
            "cut at {timeout} ms: {} ({frozen} frozen, {} opened, {:?})",
            line(&after),
            cluster.opened(),
            started.elapsed()
        ));
    }
    assert!(
        every_time,
        "begins after each freeze (1 acquired, . failed), recovered after at most 3: {report:#?}"
    );
}

/// Two servers on one cluster; A's node connections freeze while its handler runs (B connects
/// after the freeze, so its connections flow). A's renewal that the store timeout cuts has its
/// cluster connection made again, and the next renewal keeps the lease: B's retry gets `409`
/// and the handler runs once. Without it, B ran the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_server_whose_connections_stop_answering_keeps_its_handlers_lease() {
    let test = "redis_cluster_server_whose_connections_stop_answering_keeps_its_handlers_lease";
    let Some(cluster) = ProxiedCluster::start(test).await else {
        return;
    };
    let a = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let urls = cluster.urls();
    let make_b = async || RedisStore::connect_cluster(urls).await.unwrap();
    let freeze = || {
        let _ = cluster.freeze_those_open();
    };
    assert_lease_kept(a, make_b, freeze, "on a cluster").await;
}
