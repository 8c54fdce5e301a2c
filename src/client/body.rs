//! The request body an [`IdempotentRetry`](super::IdempotentRetry) service sends, and the
//! reading of a body once for every attempt.

use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::body::{BoxError, Chunks, poll_bytes};

pin_project! {
    /// The request body the inner service of an [`IdempotentRetry`](super::IdempotentRetry)
    /// receives: the bytes of a covered request, read once and sent again whole on every
    /// attempt, or the caller's body untouched when the request passes through.
    ///
    /// Its data is [`Bytes`] and its error the caller's body's error (reading the buffered
    /// bytes never fails). Build your client for it: with hyper-util,
    /// `Client::builder(TokioExecutor::new()).build_http::<RetryBody<Full<Bytes>>>()`.
    #[derive(Debug)]
    pub struct RetryBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RetryBody<B> {
    /// `body`, untouched: for calling the client without the layer.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_idempotency::RetryBody;
    ///
    /// let body = RetryBody::new(Full::new(Bytes::from_static(b"{}")));
    /// # let _ = body;
    /// ```
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Streaming { body },
        }
    }
}

impl<B> Body for RetryBody<B>
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
            KindProj::Buffered { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            KindProj::Streaming { body } => poll_bytes(body, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // With trailers to send, the length is left open: a client that knows a body's
            // exact length sends it with `Content-Length`, which cannot carry trailers.
            Kind::Buffered {
                data,
                trailers: Some(_),
            } => {
                let mut hint = SizeHint::new();
                hint.set_lower(data.as_ref().map_or(0, |d| d.len() as u64));
                hint
            }
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Streaming { body } => body.size_hint(),
        }
    }
}

/// A request body read whole, to be sent on every attempt.
#[derive(Debug, Clone)]
pub(crate) struct Buffered {
    pub(crate) data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A body for one attempt (the bytes are shared, not copied).
    pub(crate) fn body<B>(&self) -> RetryBody<B> {
        RetryBody {
            kind: Kind::Buffered {
                data: (!self.data.is_empty()).then(|| self.data.clone()),
                trailers: self.trailers.clone(),
            },
        }
    }
}

/// Why a body could not be buffered.
#[derive(Debug)]
pub(crate) enum BufferError {
    TooLarge { limit: usize },
    Read(BoxError),
}

/// Reads `body` whole, refusing it as soon as it is known to be over `limit` bytes.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Result<Buffered, BufferError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BufferError::TooLarge { limit });
    }
    let mut body = pin!(body);
    let mut chunks = Chunks::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BufferError::Read(e.into()))?;
        match frame.into_data() {
            Ok(mut data) => {
                if data.remaining() > limit - chunks.len() {
                    return Err(BufferError::TooLarge { limit });
                }
                chunks.push(data.copy_to_bytes(data.remaining()));
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    Ok(Buffered {
        data: chunks.into_bytes(),
        trailers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn stream(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = BoxError> + use<> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_is_read_once_and_sent_whole_on_every_attempt() {
        let buffered = buffer(stream(&["ab", "cd", "e"]), 5).await.unwrap();
        for _ in 0..2 {
            let body: RetryBody<Full<Bytes>> = buffered.body();
            assert_eq!(body.size_hint().exact(), Some(5));
            assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let error = buffer(stream(&["ab", "cd", "ef"]), 5).await.unwrap_err();
        assert!(matches!(error, BufferError::TooLarge { limit: 5 }));
        // Known from its size hint before a byte is read.
        let error = buffer(Full::new(Bytes::from_static(b"abcdef")), 5)
            .await
            .unwrap_err();
        assert!(matches!(error, BufferError::TooLarge { limit: 5 }));
    }

    #[tokio::test]
    async fn a_failing_body_is_a_read_error() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("reset".into()),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let error = buffer(body, 5).await.unwrap_err();
        assert!(matches!(error, BufferError::Read(e) if e.to_string() == "reset"));
    }

    #[tokio::test]
    async fn trailers_are_kept_and_an_empty_body_ends_at_once() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let buffered = buffer(body, 5).await.unwrap();
        let collected = buffered.body::<Full<Bytes>>().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "ab");

        let empty = buffer(Full::new(Bytes::new()), 0).await.unwrap();
        assert!(empty.body::<Full<Bytes>>().is_end_stream());
    }
}
