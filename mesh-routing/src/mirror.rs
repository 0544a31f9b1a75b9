//! Mirroring (VS-84): a fire-and-forget copy of a request to another destination.
//!
//! The request body is teed: every data frame the primary request reads is also offered
//! to the mirror through a small bounded channel with `try_send`, so a slow or stuck
//! mirror can never slow the primary down; if the mirror falls behind, its copy is
//! abandoned (its body ends with an error) while the primary continues untouched. The
//! mirror's response is read and discarded.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use tokio::sync::mpsc;

/// Frames the mirror may lag behind the primary before it is abandoned.
const MIRROR_BUFFER_FRAMES: usize = 64;

/// The mirror could not keep up, or the primary body was dropped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mirrored request abandoned")]
pub struct MirrorAbandoned;

/// The primary side of a teed body.
struct TeeBody {
    inner: BoxBody,
    tx: Option<mpsc::Sender<Bytes>>,
    finished: Arc<AtomicBool>,
}

impl TeeBody {
    fn finish(&mut self) {
        if self.tx.is_some() {
            self.finished.store(true, Ordering::SeqCst);
            self.tx = None;
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tx)) = (frame.data_ref(), &this.tx)
                    && tx.try_send(data.clone()).is_err()
                {
                    // Full or closed: the mirror is abandoned, the primary goes on.
                    this.tx = None;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.tx = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The mirror side of a teed body.
struct MirrorBody {
    rx: mpsc::Receiver<Bytes>,
    finished: Arc<AtomicBool>,
}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(None) if self.finished.load(Ordering::SeqCst) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(Box::new(MirrorAbandoned)))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Splits `body` into the primary body and a copy for the mirror.
pub fn tee(body: BoxBody) -> (BoxBody, BoxBody) {
    if body.is_end_stream() {
        return (body, self::body::empty());
    }
    let (tx, rx) = mpsc::channel(MIRROR_BUFFER_FRAMES);
    let finished = Arc::new(AtomicBool::new(false));
    let primary = TeeBody {
        inner: body,
        tx: Some(tx),
        finished: Arc::clone(&finished),
    };
    let mirror = MirrorBody { rx, finished };
    (self::body::boxed(primary), self::body::boxed(mirror))
}

/// A copy of `req`'s head with `body`.
pub fn copy_request(req: &Request<BoxBody>, body: BoxBody) -> Request<BoxBody> {
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body yielding `n` one-byte frames.
    struct Frames(usize);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test]
    async fn a_mirror_that_falls_behind_is_abandoned_and_the_primary_is_complete() {
        let (primary, mirror) = tee(body::boxed(Frames(MIRROR_BUFFER_FRAMES * 3)));
        // The primary is read to the end while nobody reads the mirror.
        let p = primary.collect().await.unwrap().to_bytes();
        assert_eq!(p.len(), MIRROR_BUFFER_FRAMES * 3);
        let err = mirror.collect().await.unwrap_err();
        assert!(mesh_core::is_caused_by::<MirrorAbandoned>(err.as_ref()));
    }

    #[tokio::test]
    async fn a_mirror_within_its_buffer_gets_every_frame() {
        let (primary, mirror) = tee(body::boxed(Frames(MIRROR_BUFFER_FRAMES - 1)));
        let p = primary.collect().await.unwrap().to_bytes();
        let m = mirror.collect().await.unwrap().to_bytes();
        assert_eq!(p, m);
    }

    #[tokio::test]
    async fn both_sides_see_the_whole_body() {
        let (primary, mirror) = tee(body::full("hello world"));
        let p = primary.collect().await.unwrap().to_bytes();
        let m = mirror.collect().await.unwrap().to_bytes();
        assert_eq!(p, "hello world");
        assert_eq!(m, "hello world");
    }

    #[tokio::test]
    async fn empty_body_gives_an_empty_mirror_without_a_channel() {
        let (primary, mirror) = tee(body::empty());
        assert!(primary.is_end_stream());
        assert!(mirror.collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test]
    async fn primary_dropped_early_abandons_the_mirror() {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let finished = Arc::new(AtomicBool::new(false));
        drop(tx);
        let mirror = MirrorBody { rx, finished };
        let err = mirror.collect().await.unwrap_err();
        assert!(mesh_core::is_caused_by::<MirrorAbandoned>(err.as_ref()));
    }
}
