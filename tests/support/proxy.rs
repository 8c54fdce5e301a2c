//! A TCP proxy on 127.0.0.1 whose open connections can be frozen: bytes stop both ways and the
//! sockets stay open (a network path lost, a firewall dropping packets, the old endpoint of a
//! failover), while connections opened later flow.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// The proxy: it counts the connections opened through it, and can freeze those open.
pub struct Proxy {
    port: u16,
    opened: Arc<AtomicUsize>,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Proxy {
    /// Starts a proxy to `target` (`host:port`), in a task of the current runtime.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, target)
    }

    /// Starts a proxy to `target` on `listener`, bound already (so that a server can be told
    /// the proxy's port before it starts: a cluster node that announces it).
    pub fn on(listener: TcpListener, target: String) -> Proxy {
        let proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            opened: Arc::default(),
            frozen: Arc::default(),
        };
        let (opened, frozen) = (proxy.opened.clone(), proxy.frozen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                opened.fetch_add(1, Ordering::SeqCst);
                let flag = Arc::new(AtomicBool::new(false));
                frozen.lock().unwrap().push(flag.clone());
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let ((ri, wi), (ro, wo)) = (inbound.into_split(), outbound.into_split());
                        tokio::join!(pump(ri, wo, flag.clone()), pump(ro, wi, flag));
                    }
                });
            }
        });
        proxy
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections were opened through it.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    /// Every connection open now stops forwarding, its sockets left open; answers how many.
    pub fn freeze_those_open(&self) -> usize {
        let flags = self.frozen.lock().unwrap();
        flags
            .iter()
            .for_each(|flag| flag.store(true, Ordering::SeqCst));
        flags.len()
    }
}

/// Forwards `from` to `to` until either closes; once `frozen`, swallows what comes and never
/// closes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // `to` stays open for good.
            while !matches!(from.read(&mut buf).await, Ok(0) | Err(_)) {}
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The `host:port` of a URL (`scheme://[user[:password]@]host:port/...`).
pub fn host_port(url: &str) -> &str {
    let rest = url.split("://").nth(1).unwrap();
    let rest = rest.rsplit('@').next().unwrap();
    rest.split('/').next().unwrap()
}

/// `url` with its host and port replaced by the proxy's.
pub fn through(url: &str, proxy: &Proxy) -> String {
    url.replacen(host_port(url), &format!("127.0.0.1:{}", proxy.port), 1)
}
