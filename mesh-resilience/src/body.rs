//! A response body that holds a guard until the body ends.
//!
//! Request permits and in-flight counts must live until the response body has been
//! streamed, not just until the headers arrived (STYLE.md). [`GuardBody`] drops its guard
//! at the end of the stream, on a body error, or when the body is dropped.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

/// A body that releases `G` when it ends or is dropped.
#[pin_project]
#[derive(Debug)]
pub struct GuardBody<B, G> {
    #[pin]
    inner: B,
    guard: Option<G>,
}

impl<B, G> GuardBody<B, G> {
    /// Wraps `inner`, holding `guard` (none: a plain pass-through) until it ends.
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }

    /// Whether the guard is still held.
    pub fn is_guarded(&self) -> bool {
        self.guard.is_some()
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body, G> Body for GuardBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            None | Some(Err(_)) => {
                this.guard.take();
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps the body of `res` in a [`GuardBody`]; a body that is already complete releases
/// the guard at once.
pub(crate) fn guard_response<B: Body, G>(
    res: http::Response<B>,
    guard: Option<G>,
) -> http::Response<GuardBody<B, G>> {
    let guard = if res.body().is_end_stream() {
        None
    } else {
        guard
    };
    res.map(|b| GuardBody::new(b, guard))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use mesh_core::BoxError;

    use super::*;

    fn stream(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> mesh_core::BoxBody {
        mesh_core::body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn guard_is_released_at_the_end_of_the_stream_not_before() {
        let guard = Arc::new(());
        let mut body = GuardBody::new(
            stream(vec![Ok(Frame::data(Bytes::from_static(b"a")))]),
            Some(guard.clone()),
        );
        assert!(body.frame().await.is_some());
        assert_eq!(Arc::strong_count(&guard), 2, "held while the body streams");
        assert!(body.frame().await.is_none());
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[tokio::test]
    async fn guard_is_released_on_error_and_on_drop() {
        let guard = Arc::new(());
        let mut body = GuardBody::new(stream(vec![Err("boom".into())]), Some(guard.clone()));
        assert!(body.frame().await.is_some_and(|f| f.is_err()));
        assert_eq!(Arc::strong_count(&guard), 1);

        let body = GuardBody::new(stream(vec![]), Some(guard.clone()));
        drop(body);
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[test]
    fn a_complete_response_releases_at_once() {
        let guard = Arc::new(());
        let res = guard_response(
            http::Response::new(mesh_core::body::empty()),
            Some(guard.clone()),
        );
        assert!(!res.body().is_guarded());
        assert_eq!(Arc::strong_count(&guard), 1);
    }
}
