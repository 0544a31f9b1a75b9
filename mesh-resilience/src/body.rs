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
