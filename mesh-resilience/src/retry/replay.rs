//! Replayable request bodies: eager, capped buffering (ECOSYSTEM.md §5.2, ISTIO.md VS-67).
//!
//! Before the first attempt the body is read into memory up to the replay cap. A body
//! that ends within the cap is replayed for every attempt (trailers included). A body
//! larger than the cap (known from `size_hint` up front, or discovered while reading) goes
//! upstream once: the bytes already read followed by the rest of the stream, and the
//! request is not retried.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use mesh_core::{BoxBody, BoxError};

/// What the buffering step produced.
pub(crate) enum Prepared {
    /// The whole body, replayable for every attempt.
    Replayable(Replay),
    /// Too large: the body to send once.
    Once(BoxBody),
}

/// How buffering starts: decided at once, or the body must be read.
pub(crate) enum Start {
    /// Decided without reading (empty body, or known to exceed the cap).
    Done(Prepared),
    /// The body must be read.
    Read(Buffering),
}

/// A buffered body that can be turned into a fresh [`BoxBody`] for each attempt.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replay {
    data: Bytes,
    /// Boxed: request trailers are rare, and the retry future that holds this is moved
    /// a few times per request.
    trailers: Option<Box<HeaderMap>>,
}

impl Replay {
    /// A fresh body for one attempt. An empty body costs no allocation.
    pub(crate) fn body(&self) -> BoxBody {
        if self.data.is_empty() && self.trailers.is_none() {
            return mesh_core::body::empty();
        }
        mesh_core::body::boxed(ReplayBody {
            data: Some(self.data.clone()).filter(|d| !d.is_empty()),
            trailers: self.trailers.as_deref().cloned(),
        })
    }
}

/// Reads a body into memory up to `limit` bytes.
pub(crate) struct Buffering {
    body: Option<BoxBody>,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    limit: usize,
}

impl Buffering {
    /// Starts buffering `body`, or decides at once when its size is known.
    pub(crate) fn start(body: BoxBody, limit: usize) -> Start {
        if body.is_end_stream() {
            return Start::Done(Prepared::Replayable(Replay::default()));
        }
        let hint = body.size_hint();
        if hint.lower() > limit as u64 {
            // Known in advance to be too large (content-length over the cap).
            return Start::Done(Prepared::Once(body));
        }
        Start::Read(Self {
            body: Some(body),
            buf: BytesMut::new(),
            trailers: None,
            limit,
        })
    }

    /// Reads until the body ends or exceeds the cap.
    pub(crate) fn poll_prepare(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Prepared, BoxError>> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Err("request body polled after it was prepared".into()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    return Poll::Ready(Ok(Prepared::Replayable(Replay {
                        data: std::mem::take(&mut self.buf).freeze(),
                        trailers: self.trailers.take().map(Box::new),
                    })));
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        if self.buf.len() + data.remaining() > self.limit {
                            // Over the cap: send what we have plus the rest, once.
                            let prefix = std::mem::take(&mut self.buf);
                            let rest = self.body.take().unwrap_or_else(mesh_core::body::empty);
                            let mut head = BytesMut::with_capacity(prefix.len() + data.remaining());
                            head.extend_from_slice(&prefix);
                            head.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                            return Poll::Ready(Ok(Prepared::Once(mesh_core::body::boxed(
                                Prefixed {
                                    head: Some(head.freeze()),
                                    rest,
                                },
                            ))));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            match self.trailers.as_mut() {
                                Some(have) => have.extend(t),
                                None => self.trailers = Some(t),
                            }
                        }
                    }
                },
            }
        }
    }
}

/// One attempt's copy of a buffered body.
struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The bytes read while buffering, then the rest of the original body.
struct Prefixed {
    head: Option<Bytes>,
    rest: BoxBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + head);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunked(chunks: Vec<&'static [u8]>) -> BoxBody {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c))));
        mesh_core::body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    async fn prepare(body: BoxBody, limit: usize) -> Prepared {
        match Buffering::start(body, limit) {
            Start::Done(p) => p,
            Start::Read(mut b) => std::future::poll_fn(|cx| b.poll_prepare(cx)).await.unwrap(),
        }
    }

    #[tokio::test]
    async fn small_bodies_replay_identically() {
        let Prepared::Replayable(r) = prepare(chunked(vec![b"ab", b"cd"]), 4).await else {
            panic!("4 bytes fit a 4-byte cap");
        };
        for _ in 0..3 {
            let bytes = r.body().collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"abcd");
        }
    }

    #[tokio::test]
    async fn bodies_over_the_cap_go_once_with_every_byte() {
        let Prepared::Once(body) = prepare(chunked(vec![b"ab", b"cd", b"ef"]), 3).await else {
            panic!("6 bytes exceed a 3-byte cap");
        };
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdef");
        let known = mesh_core::body::full(vec![0u8; 10]);
        assert!(matches!(
            Buffering::start(known, 9),
            Start::Done(Prepared::Once(_))
        ));
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let body = mesh_core::body::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        let Prepared::Replayable(r) = prepare(body, 10).await else {
            panic!("fits");
        };
        let collected = r.body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&t));
    }
}
