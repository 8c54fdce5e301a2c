//! Redis servers and Redis Clusters of a test's own, from `REDIS_SERVER_BIN` and
//! `REDIS_CLI_BIN` (exported by `scripts/test-services`), for tests that kill, freeze, reshard
//! or count the commands of a server: nothing they do disturbs the tests that share the
//! servers of `scripts/test-services`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary in `var`, or `None` after printing that `test` is skipped.
pub fn binary(var: &str, test: &str) -> Option<String> {
    super::server_url(var, test)
}

/// The URLs of the shared cluster's nodes (`REDIS_CLUSTER_URLS`), or `None` after printing
/// that `test` is skipped.
pub fn shared_cluster(test: &str) -> Option<Vec<String>> {
    let urls = super::server_url("REDIS_CLUSTER_URLS", test)?;
    Some(urls.split(',').map(str::to_owned).collect())
}

/// In the arguments of [`Node::start`], the node's cluster bus port: a free port, picked again
/// with the node's own at each attempt (a port picked once may be taken by the time the server
/// binds it, and then by every attempt after).
pub const BUS: &str = "<bus port>";

/// One `redis-server` process of the test's own, killed when dropped.
pub struct Node {
    pub port: u16,
    /// The port [`BUS`] stood for in its arguments (0 without one).
    pub bus: u16,
    bin: String,
    args: Vec<String>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Node {
    /// Starts a server with `args` added to its command line, and waits until it accepts
    /// connections.
    ///
    /// A free port can be taken by another process before the server binds it: a server that
    /// exits at once is started again on another port.
    pub fn start(bin: &str, args: &[&str]) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let bus = if args.contains(&BUS) { free_port() } else { 0 };
            let dir = std::env::temp_dir()
                .join(format!("idempotency-redis-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let args = args.iter().map(|&arg| match arg {
                BUS => bus.to_string(),
                arg => arg.to_owned(),
            });
            let mut node = Self {
                port,
                bus,
                bin: bin.to_owned(),
                args: args.collect(),
                child: None,
                dir,
            };
            if node.launch() {
                return node;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts the server (again, after `kill`) on its port, and waits until it accepts
    /// connections.
    pub fn restart(&mut self) {
        assert!(self.launch(), "redis-server did not start");
    }

    /// Starts the server on its port; `true` once it accepts connections, `false` when it
    /// exited first (its port was taken) or did not listen within 10 s.
    fn launch(&mut self) -> bool {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Another process's server on the port answers too: this one must still run.
        std::thread::sleep(Duration::from_millis(50));
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !running {
            self.kill();
        }
        running
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` to the server: `STOP` freezes it, `CONT` wakes it.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("the server runs")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal} {pid}");
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of the test's own: `primaries` primaries with `replicas` replicas each, a
/// two-second node timeout (a failover takes about four seconds; shorter would risk failovers
/// nobody asked for on a loaded machine) and no full-coverage requirement (a dead primary stops
/// only its own slots).
pub struct Cluster {
    pub nodes: Vec<Node>,
    cli: String,
}

impl Cluster {
    /// `None` (after printing that `test` is skipped) without `REDIS_SERVER_BIN` and
    /// `REDIS_CLI_BIN`.
    pub async fn start(test: &str, primaries: usize, replicas: usize) -> Option<Self> {
        let server = binary("REDIS_SERVER_BIN", test)?;
        let cli = binary("REDIS_CLI_BIN", test)?;
        let nodes: Vec<Node> = (0..primaries * (1 + replicas))
            .map(|_| {
                Node::start(
                    &server,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        BUS,
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-replica-validity-factor",
                        "0",
                        "--cluster-require-full-coverage",
                        "no",
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            })
            .collect();
        let cluster = Self { nodes, cli };
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        create.extend([
            "--cluster-replicas".to_owned(),
            replicas.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let out = cluster.cli(&create);
        assert!(out.status.success(), "cluster create: {out:?}");
        cluster.wait_until_ready(Duration::from_secs(30)).await;
        Some(cluster)
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Node::url)
            .collect()
    }

    /// Runs `redis-cli` with `args`.
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> std::process::Output {
        Command::new(&self.cli)
            .args(args)
            .output()
            .expect("run redis-cli")
    }

    /// Waits until every running node sees every slot served, and every primary has its
    /// replicas in sync.
    pub async fn wait_until_ready(&self, limit: Duration) {
        let ready = super::eventually(limit, async || self.is_ready().await).await;
        assert!(ready, "the cluster did not become ready");
    }

    async fn is_ready(&self) -> bool {
        for url in self.urls() {
            let Ok(info) = node_command(&url, &["CLUSTER", "INFO"]).await else {
                return false;
            };
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return false;
            }
            // A replica promoted before its first sync would take over with no records.
            let Ok(info) = node_command(&url, &["INFO", "REPLICATION"]).await else {
                return false;
            };
            if info.contains("role:slave") && !info.contains("master_link_status:up") {
                return false;
            }
            if info.contains("role:master") && info.contains("state=wait_bgsave") {
                return false;
            }
        }
        let check = self.cli(&[
            "--cluster",
            "check",
            &self.urls()[0].replace("redis://", ""),
        ]);
        check.status.success()
    }

    /// The node with `port`.
    pub fn node(&mut self, port: u16) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }
}

/// Runs a command on one node (not through the cluster), answering its reply as text.
pub async fn node_command(url: &str, args: &[&str]) -> redis::RedisResult<String> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let value: redis::Value = cmd.query_async(&mut conn).await?;
    Ok(text(&value))
}

fn text(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("\n"),
        other => format!("{other:?}"),
    }
}

/// The port of the primary that holds the record of `redis_key`, as the node at `url` sees it.
pub async fn primary_of(url: &str, redis_key: &str) -> u16 {
    let slot: i64 = node_command(url, &["CLUSTER", "KEYSLOT", redis_key])
        .await
        .unwrap()
        .parse()
        .unwrap();
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // CLUSTER SLOTS: [[start, end, [host, port, id], replicas...], ...]
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap();
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            continue;
        };
        let (redis::Value::Int(start), redis::Value::Int(end), redis::Value::Array(primary)) =
            (&fields[0], &fields[1], &fields[2])
        else {
            continue;
        };
        if (*start..=*end).contains(&slot)
            && let redis::Value::Int(port) = primary[1]
        {
            return port as u16;
        }
    }
    panic!("no primary serves slot {slot}");
}

/// The ports of the nodes among `urls` that answer and are primaries.
pub async fn primaries(urls: &[String]) -> Vec<u16> {
    let mut ports = Vec::new();
    for url in urls {
        if let Ok(role) = node_command(url, &["ROLE"]).await
            && role.starts_with("master")
        {
            ports.push(port_of(url));
        }
    }
    ports
}

/// The port of a `redis://127.0.0.1:PORT` URL.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// The keys under `pattern` on the node at `url`, by `SCAN`.
pub async fn keys_on(url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}
