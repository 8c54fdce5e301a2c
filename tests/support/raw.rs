//! HTTP/1.1 by hand on a raw `TcpStream`: a request written whole on a connection of its own
//! (which the client may then drop: it hangs up), and the answer read until the server closes
//! the connection (`Connection: close`).

use std::fmt;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `POST` of `body` to `path` with `headers`, its `Content-Length`, and `Connection: close`.
pub fn post(path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut request = format!("POST {path} HTTP/1.1\r\nHost: test\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    request
}

/// An answer read off the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct RawReply {
    pub status: u16,
    /// The status line and the header lines.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    /// Parses a whole answer; `None` when there is none (the connection closed first).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8(bytes[..split].to_vec()).unwrap();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some(Self {
            status,
            head,
            body: bytes[split + 4..].to_vec(),
        })
    }

    /// `HTTP/1.1 201 Created`.
    pub fn status_line(&self) -> &str {
        self.head.lines().next().unwrap()
    }

    /// The value of the header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The body, as text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

impl fmt::Debug for RawReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n\n{}",
            self.head,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Writes `request` whole on a connection of its own and returns the connection: dropping it
/// hangs up.
pub async fn send_only(addr: SocketAddr, request: impl AsRef<[u8]>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_ref()).await.unwrap();
    stream
}

/// Writes `request` on a connection of its own and reads the answer until the server closes
/// the connection; `None` when it could not connect or the server closed the connection
/// without an answer (it crashed, or its handler panicked).
pub async fn try_exchange(addr: SocketAddr, request: impl AsRef<[u8]>) -> Option<RawReply> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(request.as_ref()).await.ok()?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.ok()?;
    RawReply::parse(&bytes)
}

/// As [`try_exchange`], for an answer that must come.
pub async fn exchange(addr: SocketAddr, request: impl AsRef<[u8]>) -> RawReply {
    try_exchange(addr, request)
        .await
        .expect("the server answers")
}
