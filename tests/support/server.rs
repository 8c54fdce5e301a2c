//! A real server on loopback (`axum::serve` on 127.0.0.1:0), stopped gracefully when shut
//! down or aborted when dropped; and reading the process's memory.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_idempotency::DetachedRuns;

/// A server on loopback.
pub struct Server {
    pub addr: SocketAddr,
    pub detached: DetachedRuns,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `app` on a free port. `detached` is the layer's (`layer.detached_runs()`), for
    /// [`shut_down`](Self::shut_down) to wait for; `DetachedRuns::default()` when it does not
    /// matter.
    pub async fn start(app: Router, detached: DetachedRuns) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            detached,
            shutdown: Some(tx),
            task,
        }
    }

    /// Stops accepting connections, waits for the open ones, then for the detached runs (at
    /// most `deadline`); `true` when none is left.
    pub async fn shut_down(mut self, deadline: Duration) -> bool {
        let _ = self.shutdown.take().unwrap().send(());
        (&mut self.task).await.unwrap();
        self.detached.wait_timeout(deadline).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resident memory of this process, in KiB (0 where `/proc` is not there).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
