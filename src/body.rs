//! The request and response body types of the [`Idempotency`](crate::Idempotency) service,
//! and the reading of bodies: a keyed request's, fingerprinted in one pass, and a handler's
//! response, to store it.

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::config::Config;
use crate::error::Problem;
use crate::fingerprint::{Fingerprint, Hasher};
use crate::outcome::Outcome;

pin_project! {
    /// The request body the inner service receives: the client's body untouched when the
    /// request passes through, or the buffered body of a keyed request.
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestBodyProj]
    #[derive(Debug)]
    enum RequestKind<B> {
        /// A keyed request's body, read whole to fingerprint it, in the chunks it arrived in,
        /// and its trailers.
        Buffered {
            first: Option<Bytes>,
            rest: VecDeque<Bytes>,
            trailers: Option<Box<HeaderMap>>,
        },
        /// The body of a request that passes through.
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn buffered(chunks: Chunks) -> Self {
        Self {
            kind: RequestKind::Buffered {
                first: chunks.first,
                rest: chunks.rest,
                trailers: chunks.trailers,
            },
        }
    }

    pub(crate) fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }
}

/// A body read whole, kept in the chunks it arrived in (no copy); the common single chunk
/// needs no allocation. Small chunks after the first are copied together into blocks of up to
/// [`BLOCK`] bytes: a body sent a byte at a time would otherwise cost a `Bytes` (and its share
/// of the connection's buffer) per byte, dozens of times its size.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
    len: usize,
    /// A request's trailers, passed on to its handler (never fingerprinted).
    trailers: Option<Box<HeaderMap>>,
}

/// A chunk under this many bytes, after the first, is copied into a block.
const SMALL: usize = 1024;
/// The most bytes of a block of small chunks.
const BLOCK: usize = 16 * 1024;

impl Chunks {
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        if self.first.is_none() {
            self.first = Some(chunk);
            return;
        }
        if chunk.len() >= SMALL {
            self.rest.push_back(chunk);
            return;
        }
        // The last block, if it is one (its own buffer, with room): the chunk is added to it.
        if let Some(last) = self.rest.pop_back() {
            let added = match last.try_into_mut() {
                Ok(mut block) if block.len() + chunk.len() <= BLOCK => {
                    block.extend_from_slice(&chunk);
                    self.rest.push_back(block.freeze());
                    true
                }
                Ok(block) => {
                    self.rest.push_back(block.freeze());
                    false
                }
                Err(last) => {
                    self.rest.push_back(last);
                    false
                }
            };
            if added {
                return;
            }
        }
        // Sized for what it holds, and grown as chunks are added: a small chunk that cannot
        // join a block (after one of the connection's own) never costs a whole block.
        let mut block = bytes::BytesMut::with_capacity(SMALL);
        block.extend_from_slice(&chunk);
        self.rest.push_back(block.freeze());
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The whole body as one `Bytes`, taken: free for zero or one chunk (the chunk itself, not
    /// a clone, which would make a buffer of its own a shared one: an allocation), one copy
    /// otherwise.
    pub(crate) fn into_bytes(mut self) -> Bytes {
        match self.first.take() {
            Some(first) if self.rest.is_empty() => first,
            first => {
                self.first = first;
                self.to_bytes()
            }
        }
    }

    /// The whole body as one `Bytes`: a clone for zero or one chunk, one copy otherwise.
    pub(crate) fn to_bytes(&self) -> Bytes {
        match &self.first {
            None => Bytes::new(),
            Some(first) if self.rest.is_empty() => first.clone(),
            Some(first) => {
                let mut all = bytes::BytesMut::with_capacity(self.len);
                all.extend_from_slice(first);
                for chunk in &self.rest {
                    all.extend_from_slice(chunk);
                }
                all.freeze()
            }
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestBodyProj::Buffered {
                first,
                rest,
                trailers,
            } => Poll::Ready(
                first
                    .take()
                    .or_else(|| rest.pop_front())
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(|t| Frame::trailers(*t)))
                    .map(Ok),
            ),
            RequestBodyProj::Streaming { body } => poll_bytes(body, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered {
                first,
                rest,
                trailers,
            } => first.is_none() && rest.is_empty() && trailers.is_none(),
            RequestKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered {
                first,
                rest,
                trailers,
            } => {
                let len = first.as_ref().map_or(0, |d| d.len() as u64)
                    + rest.iter().map(|d| d.len() as u64).sum::<u64>();
                // Not exact with trailers to follow (as for a response): a client that passes
                // the body on would send an exact size as `Content-Length`, without trailers.
                match trailers {
                    Some(_) => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(len);
                        hint
                    }
                    None => SizeHint::with_exact(len),
                }
            }
            RequestKind::Streaming { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body of the [`Idempotency`](crate::Idempotency) service: a replayed or
    /// buffered response, an error, or the handler's body untouched.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    pub(crate) enum ResponseKind<B> {
        /// A replayed response, an error, or a handler's response that was buffered to store it:
        /// its data, then its trailers when it has any.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        /// The handler's response, untouched.
        Inner { #[pin] body: B },
        /// A handler's response too large to store: the part already read, then the rest.
        Prefixed { prefix: Option<Bytes>, #[pin] body: B },
        /// A handler's response whose body failed while it was read to be stored: the part
        /// already read, then, once the server had a chance to send it (`paused`), the error.
        Failed { prefix: Option<Bytes>, paused: bool, error: Option<BoxError> },
    }
}

/// The error type of [`ResponseBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> ResponseBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self::full_with(data, None)
    }

    /// `data`, then `trailers` when there are any.
    pub(crate) fn full_with(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::from(ResponseKind::Full {
            data: (!data.is_empty()).then_some(data),
            trailers: trailers.map(Box::new),
        })
    }

    pub(crate) fn inner(body: B) -> Self {
        Self::from(ResponseKind::Inner { body })
    }
}

/// An empty body, for middleware that answers on its own (`tower_http`'s `TimeoutLayer`, say).
impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::full(Bytes::new())
    }
}

impl<B> From<ResponseKind<B>> for ResponseBody<B> {
    fn from(kind: ResponseKind<B>) -> Self {
        Self { kind }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let boxed = |poll: Poll<Option<Result<Frame<Bytes>, B::Error>>>| {
            poll.map(|frame| frame.map(|f| f.map_err(Into::into)))
        };
        match self.project().kind.project() {
            ResponseBodyProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            ResponseBodyProj::Inner { body } => boxed(poll_bytes(body, cx)),
            ResponseBodyProj::Prefixed { prefix, body } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => boxed(poll_bytes(body, cx)),
            },
            ResponseBodyProj::Failed {
                prefix,
                paused,
                error,
            } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                // A server that gets the error in the same turn as the head and the data (all
                // ready at once, the body having been read whole) may drop the connection
                // before it sends any of them: one `Pending` lets it write what came first.
                None if !*paused && error.is_some() => {
                    *paused = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
            ResponseKind::Failed { prefix, error, .. } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // Not exact with trailers to follow: a server that read an exact size would send it
            // as `Content-Length`, and HTTP/1.1 carries trailers only in a chunked body.
            ResponseKind::Full {
                data,
                trailers: Some(_),
            } => {
                let mut hint = SizeHint::new();
                hint.set_lower(exact(data).lower());
                hint
            }
            ResponseKind::Full { data, .. } => exact(data),
            ResponseKind::Failed { .. } => SizeHint::new(),
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Prefixed { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

fn exact(data: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
}

/// Polls a frame of `body`, turning its data into `Bytes` (without a copy when it already is).
pub(crate) fn poll_bytes<B>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body,
    B::Data: Buf,
{
    body.poll_frame(cx).map(|frame| {
        frame.map(|frame| frame.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining()))))
    })
}

// Reading bodies: a keyed request's whole body, fingerprinted as it arrives, and a handler's
// response, up to the cap, to store it.

pub(crate) fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub(crate) enum BodyError {
    /// Over the layer's `max_body_bytes`.
    TooLarge,
    /// Over a limit outside the layer (tower-http's `RequestBodyLimitLayer`, a `Limited` body),
    /// which ended the body with its `LengthLimitError`.
    OverLimit,
    Read,
}

impl BodyError {
    /// What a body's error means: over a limit set outside the layer, or a body that could not
    /// be read.
    fn of(err: BoxError) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        while let Some(err) = source {
            if err.is::<http_body_util::LengthLimitError>() {
                return Self::OverLimit;
            }
            source = err.source();
        }
        Self::Read
    }

    pub(crate) fn problem(self, config: &Config) -> (Problem, Outcome) {
        match self {
            Self::TooLarge => (
                Problem::body_too_large(config.max_body_bytes),
                Outcome::TooLarge,
            ),
            Self::OverLimit => (Problem::body_over_limit(), Outcome::TooLarge),
            Self::Read => (Problem::body_incomplete(), Outcome::BodyError),
        }
    }
}

/// Reads the request body up to the limit, hashing each chunk as it arrives (one pass, no
/// copy: the chunks go on to the handler as they came), or the whole body once read when the
/// layer fingerprints JSON canonically or with a `Fingerprinter`.
pub(crate) async fn read_body<B>(
    body: B,
    parts: &Parts,
    config: &Config,
) -> Result<(Chunks, Fingerprint), BodyError>
where
    B: Body<Error: Into<BoxError>>,
    B::Data: Buf,
{
    let mut hasher = Hasher::new(parts, &config.fingerprint_headers);
    let whole = config.body_fingerprint.start(&mut hasher, parts);
    let mut chunks = Chunks::default();
    let mut body = pin!(body);
    while let Some(frame) = body.frame().await {
        let mut data = match frame.map_err(|err| BodyError::of(err.into()))?.into_data() {
            Ok(data) => data,
            // Trailers are not part of the fingerprint; the handler gets them.
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    chunks.trailers = Some(Box::new(trailers));
                }
                continue;
            }
        };
        if chunks.len() + data.remaining() > config.max_body_bytes {
            return Err(BodyError::TooLarge);
        }
        let chunk = data.copy_to_bytes(data.remaining());
        if !whole {
            hasher.body(&chunk);
        }
        chunks.push(chunk);
    }
    if whole {
        let body = chunks.to_bytes();
        config.body_fingerprint.whole(&mut hasher, parts, &body);
    }
    Ok((chunks, hasher.finish()))
}

pub(crate) enum ResponseRead<B> {
    Whole {
        chunks: Chunks,
        trailers: Option<HeaderMap>,
    },
    TooLarge {
        prefix: Chunks,
        rest: B,
    },
    Failed {
        prefix: Chunks,
        error: BoxError,
    },
}

/// Reads a handler's response body to store it, up to `limit` bytes.
pub(crate) async fn read_response<B>(mut body: B, limit: usize) -> ResponseRead<B>
where
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    let mut chunks = Chunks::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Err(error) => {
                return ResponseRead::Failed {
                    prefix: chunks,
                    error: error.into(),
                };
            }
            Ok(frame) => {
                let mut data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers end the body; they are stored and sent after it.
                        if let Ok(frame) = frame.into_trailers() {
                            trailers = Some(frame);
                            break;
                        }
                        continue;
                    }
                };
                chunks.push(data.copy_to_bytes(data.remaining()));
                if chunks.len() > limit {
                    return ResponseRead::TooLarge {
                        prefix: chunks,
                        rest: body,
                    };
                }
            }
        }
    }
    ResponseRead::Whole { chunks, trailers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn bodies_yield_their_bytes() {
        let mut chunks = Chunks::default();
        chunks.push(Bytes::from_static(b"ab"));
        chunks.push(Bytes::new());
        chunks.push(Bytes::from_static(b"c"));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.to_bytes(), "abc");
        let body = RequestBody::<Full<Bytes>>::buffered(chunks);
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");

        // A body a byte at a time: kept in blocks, in order.
        let mut chunks = Chunks::default();
        let all: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for (i, byte) in all.iter().enumerate() {
            chunks.push(Bytes::copy_from_slice(std::slice::from_ref(byte)));
            if i == 50_000 {
                chunks.push(Bytes::from(vec![7; 4096]));
            }
        }
        let mut expected = all[..=50_000].to_vec();
        expected.extend_from_slice(&[7; 4096]);
        expected.extend_from_slice(&all[50_001..]);
        assert_eq!(chunks.len(), expected.len());
        assert!(chunks.rest.len() <= 2 * expected.len() / BLOCK + 2);
        assert_eq!(chunks.to_bytes(), expected);
        let body = RequestBody::<Full<Bytes>>::buffered(chunks);
        assert_eq!(body.size_hint().exact(), Some(expected.len() as u64));
        assert_eq!(body.collect().await.unwrap().to_bytes(), expected);

        // Small chunks between large ones that cannot be joined (the large ones still share
        // their buffer): each small one has a block of its own, made for `SMALL` bytes.
        let mut chunks = Chunks::default();
        let large = Bytes::from(vec![1; 1024]);
        let mut expected = Vec::new();
        for _ in 0..64 {
            let shared = large.clone();
            chunks.push(shared);
            chunks.push(Bytes::from_static(b"x"));
            expected.extend_from_slice(&large);
            expected.push(b'x');
        }
        assert_eq!(
            chunks.rest.len(),
            127,
            "the first large chunk, then a block and a chunk"
        );
        assert_eq!(chunks.to_bytes(), expected);

        let body = ResponseBody::from(ResponseKind::Prefixed {
            prefix: Some(Bytes::from_static(b"ab")),
            body: Full::new(Bytes::from_static(b"cd")),
        });
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");

        let empty = ResponseBody::<Full<Bytes>>::full(Bytes::new());
        assert!(empty.is_end_stream());
    }
}
