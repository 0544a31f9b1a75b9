//! Body type aliases shared by the layers.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

use crate::error::BoxError;

/// A boxed, `Send + Sync` HTTP body with [`BoxError`] errors: what the proxy passes between layers.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// An empty [`BoxBody`].
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A [`BoxBody`] holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes any body whose error converts into [`BoxError`]. A body that is a [`BoxBody`]
/// already is returned as it is: layers box what they receive, and boxing a box again
/// would cost an allocation per request for each layer that does.
pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(already) = (&mut slot as &mut dyn std::any::Any)
        .downcast_mut::<Option<BoxBody>>()
        .and_then(Option::take)
    {
        return already;
    }
    match slot {
        Some(body) => body.map_err(Into::into).boxed(),
        // Taken only when it was a `BoxBody`, which returned above.
        None => empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[test]
    fn a_boxed_body_passes_through_and_others_are_boxed_with_their_bytes() {
        // The allocation this saves is counted by the proxy_counts bench.
        let twice = boxed(boxed(full("paid")));
        assert_eq!(twice.size_hint().exact(), Some(4));
        let plain = boxed(Full::new(Bytes::from_static(b"x")));
        assert_eq!(plain.size_hint().exact(), Some(1));
        assert!(boxed(empty()).is_end_stream());
    }
}
