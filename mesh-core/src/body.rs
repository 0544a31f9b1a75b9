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

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}
