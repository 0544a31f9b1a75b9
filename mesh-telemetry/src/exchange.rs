//! Istio's workload metadata exchange over HTTP: who the peer of a request is, beyond
//! its SPIFFE identity, so both reporters fill the peer's `*_workload`, `*_app`,
//! `*_version`, `*_canonical_*` and `*_cluster` labels (`mesh-telemetry/ISTIO.md`, TM-09..TM-14).
//!
//! # Behaviour
//!
//! A proxy describes itself once ([`NodeMetadata`]: Istio's node metadata fields `NAME`,
//! `NAMESPACE`, `WORKLOAD_NAME`, `CLUSTER_ID`, `OWNER`, `LABELS`), encoded as Istio's
//! sidecars encode it: a `google.protobuf.Struct`, serialized deterministically and
//! base64-encoded, in `x-envoy-peer-metadata`, with the node id in
//! `x-envoy-peer-metadata-id` ([`LocalMetadata`]).
//!
//! - The client side adds both headers to requests to mesh endpoints and reads the
//!   server's answer from the response headers.
//! - The server side reads them from the request and answers with its own metadata in
//!   the response headers (only to a request that carried metadata over mTLS).
//!
//! Metadata is believed only from a peer that authenticated with mTLS, and only when the
//! namespace it claims is the namespace of its SPIFFE identity ([`take`]); otherwise it
//! is ignored (a plaintext client, or a workload of one namespace claiming another). The
//! headers are removed either way, so neither the application nor the downstream client
//! sees them.
//!
//! # Example
//!
//! ```
//! use mesh_core::Identity;
//! use mesh_telemetry::exchange::{self, LocalMetadata, NodeMetadata};
//!
//! let node = NodeMetadata::new("reviews-v2", "default", "Kubernetes")
//!     .label("app", "reviews")
//!     .label("version", "v2");
//! let local = LocalMetadata::new(&node, "sidecar~10.0.0.7~reviews-v2.default~default.svc.cluster.local");
//! let mut headers = http::HeaderMap::new();
//! local.insert(&mut headers);
//!
//! let peer = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
//! let w = exchange::take(&mut headers, Some(&peer)).unwrap();
//! assert_eq!((w.name.as_str(), w.app.as_str(), w.version.as_str()), ("reviews-v2", "reviews", "v2"));
//! assert_eq!(w.canonical_service, "reviews");
//! assert!(headers.is_empty());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::Identity;
use mesh_core::extensions::PeerIdentity;

use crate::metrics::Workload;

/// The request and response header carrying the base64 `Struct` of node metadata.
pub const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
/// The header carrying the sender's node id (Istio uses it as a cache key).
pub const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

/// `service.istio.io/canonical-name`.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// `service.istio.io/canonical-revision`.
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";

/// Istio's default cluster id (`values.global.multiCluster.clusterName`).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Upper bound on an accepted `x-envoy-peer-metadata` value: node metadata is a few
/// hundred bytes; anything far larger is not decoded.
const MAX_ENCODED: usize = 16 * 1024;

/// `google.protobuf.Struct` (struct.proto), declared for prost.
#[derive(Clone, PartialEq, prost::Message)]
struct PbStruct {
    #[prost(btree_map = "string, message", tag = "1")]
    fields: BTreeMap<String, PbValue>,
}

/// `google.protobuf.Value`.
#[derive(Clone, PartialEq, prost::Message)]
struct PbValue {
    #[prost(oneof = "PbKind", tags = "1, 2, 3, 4, 5, 6")]
    kind: Option<PbKind>,
}

/// `google.protobuf.Value.kind`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum PbKind {
    #[prost(int32, tag = "1")]
    Null(i32),
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Struct(PbStruct),
    #[prost(message, tag = "6")]
    List(PbList),
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, prost::Message)]
struct PbList {
    #[prost(message, repeated, tag = "1")]
    values: Vec<PbValue>,
}

fn string(s: &str) -> PbValue {
    PbValue {
        kind: Some(PbKind::String(s.to_owned())),
    }
}

/// The node metadata a proxy sends about its workload (the subset of Istio's
/// `FlatNode` that telemetry reads).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMetadata {
    /// `NAME`: the instance (pod) name.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKLOAD_NAME`: the workload (deployment) name.
    pub workload_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `OWNER`: `kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<workload>`.
    pub owner: String,
    /// `LABELS`: pod labels, with the canonical service labels filled in.
    pub labels: BTreeMap<String, String>,
}

impl NodeMetadata {
    /// The metadata of workload `workload_name` in `namespace` of cluster `cluster_id`,
    /// owned by a Deployment of the same name.
    pub fn new(
        workload_name: impl Into<String>,
        namespace: impl Into<String>,
        cluster_id: impl Into<String>,
    ) -> Self {
        let workload_name = workload_name.into();
        let namespace = namespace.into();
        Self {
            name: workload_name.clone(),
            owner: format!(
                "kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{workload_name}"
            ),
            workload_name,
            namespace,
            cluster_id: cluster_id.into(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds every label of `labels`.
    #[must_use]
    pub fn labels<'a>(
        mut self,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        for (k, v) in labels {
            self.labels.insert(k.clone(), v.clone());
        }
        self
    }

    /// The deterministic protobuf encoding of the `Struct`, base64 with padding. The
    /// canonical service labels are always present, filled as the injector fills them
    /// ([`canonical`]).
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.encode_struct())
    }

    /// The deterministic protobuf encoding of the `Struct` (see [`encode`](Self::encode)).
    fn encode_struct(&self) -> Vec<u8> {
        let mut fields = BTreeMap::new();
        for (key, value) in [
            ("NAME", &self.name),
            ("NAMESPACE", &self.namespace),
            ("WORKLOAD_NAME", &self.workload_name),
            ("CLUSTER_ID", &self.cluster_id),
            ("OWNER", &self.owner),
        ] {
            if !value.is_empty() {
                fields.insert(key.to_owned(), string(value));
            }
        }
        let (service, revision) = canonical(&self.labels, &self.workload_name);
        let mut labels: BTreeMap<String, PbValue> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        labels.insert(CANONICAL_NAME_LABEL.to_owned(), string(&service));
        labels.insert(CANONICAL_REVISION_LABEL.to_owned(), string(&revision));
        fields.insert(
            "LABELS".to_owned(),
            PbValue {
                kind: Some(PbKind::Struct(PbStruct { fields: labels })),
            },
        );
        prost::Message::encode_to_vec(&PbStruct { fields })
    }

    /// Decodes a header value (base64 with or without padding); `None` when it is not
    /// a protobuf `Struct`. Fields of other types than strings are ignored.
    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() > MAX_ENCODED {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT
            .decode(value)
            .ok()?;
        Self::decode_struct(&bytes)
    }

    /// Decodes the protobuf encoding of a `Struct`.
    fn decode_struct(bytes: &[u8]) -> Option<Self> {
        let pb: PbStruct = prost::Message::decode(bytes).ok()?;
        let text = |v: &PbValue| match &v.kind {
            Some(PbKind::String(s)) => Some(s.clone()),
            _ => None,
        };
        let mut node = NodeMetadata::default();
        for (key, value) in &pb.fields {
            let slot = match key.as_str() {
                "NAME" => &mut node.name,
                "NAMESPACE" => &mut node.namespace,
                "WORKLOAD_NAME" => &mut node.workload_name,
                "CLUSTER_ID" => &mut node.cluster_id,
                "OWNER" => &mut node.owner,
                "LABELS" => {
                    if let Some(PbKind::Struct(labels)) = &value.kind {
                        node.labels = labels
                            .fields
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), text(v)?)))
                            .collect();
                    }
                    continue;
                }
                _ => continue,
            };
            if let Some(s) = text(value) {
                *slot = s;
            }
        }
        Some(node)
    }

    /// The telemetry labels of this workload as Istio's stats filter reads them: the
    /// workload name, namespace, `app` and `version` labels, the canonical service and
    /// revision ([`canonical`]) and the cluster id.
    pub fn workload(&self) -> Workload {
        let (canonical_service, canonical_revision) = canonical(&self.labels, &self.workload_name);
        Workload {
            name: self.workload_name.clone(),
            namespace: self.namespace.clone(),
            app: self.labels.get("app").cloned().unwrap_or_default(),
            version: self.labels.get("version").cloned().unwrap_or_default(),
            canonical_service,
            canonical_revision,
            cluster: self.cluster_id.clone(),
            principal: None,
        }
    }
}

/// The canonical service and revision of a workload with `labels` named
/// `workload_name`, as Istio's injector sets them (TM-10): `service.istio.io/canonical-name`,
/// else `app.kubernetes.io/name`, else `app`, else the workload name; and
/// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else
/// `version`, else `latest`.
pub fn canonical(labels: &BTreeMap<String, String>, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
    };
    let service = first(&[CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload_name.to_owned());
    let revision = first(&[
        CANONICAL_REVISION_LABEL,
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    (service, revision)
}

/// `google.protobuf.Any` (any.proto), declared for prost.
#[derive(Clone, PartialEq, prost::Message)]
struct PbAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// The ALPN protocol a TCP connection between sidecars negotiates to run the exchange
/// (a client offers it before `istio`).
pub const TCP_EXCHANGE_ALPN: &[u8] = b"istio-peer-exchange";
/// The first four bytes of a TCP metadata exchange frame (big-endian).
const TCP_MAGIC: u32 = 0x3D23_0467;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// Why a TCP metadata exchange frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TcpExchangeError {
    /// The connection failed or ended before the frame did.
    #[error("reading the peer's metadata: {0}")]
    Io(#[from] std::io::Error),
    /// The first bytes are not a metadata exchange frame.
    #[error("the peer did not start with a metadata exchange frame")]
    NotAFrame,
    /// The frame announces more than [`MAX_ENCODED`] bytes.
    #[error("peer metadata of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// Reads the peer's TCP metadata exchange frame from the start of `io` (Istio's
/// `istio-peer-exchange`: a four-byte magic number, a four-byte length, both
/// big-endian, then a `google.protobuf.Any` holding the node metadata `Struct`). Returns
/// `None` for a well-framed payload that is not node metadata.
pub async fn read_tcp_frame<R>(io: &mut R) -> Result<Option<NodeMetadata>, TcpExchangeError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 8];
    io.read_exact(&mut head).await?;
    let (magic, len) = head.split_at(4);
    if magic != TCP_MAGIC.to_be_bytes() {
        return Err(TcpExchangeError::NotAFrame);
    }
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_ENCODED {
        return Err(TcpExchangeError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    let Ok(any) = <PbAny as prost::Message>::decode(payload.as_slice()) else {
        return Ok(None);
    };
    if any.type_url != STRUCT_TYPE_URL {
        return Ok(None);
    }
    Ok(NodeMetadata::decode_struct(&any.value))
}

/// This proxy's metadata, encoded once into header values and a TCP exchange frame.
#[derive(Clone, Debug)]
pub struct LocalMetadata {
    id: HeaderValue,
    value: HeaderValue,
    tcp: bytes::Bytes,
}

impl LocalMetadata {
    /// Encodes `node`; `id` is the node id (`sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub fn new(node: &NodeMetadata, id: &str) -> Self {
        Self {
            id: HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            value: HeaderValue::from_str(&node.encode())
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            tcp: tcp_frame(node),
        }
    }

    /// The TCP metadata exchange frame ([`read_tcp_frame`] reads it) a proxy writes
    /// first on a connection that negotiated [`TCP_EXCHANGE_ALPN`].
    pub fn tcp_frame(&self) -> &bytes::Bytes {
        &self.tcp
    }

    /// Sets both headers in `headers`, replacing any present.
    pub fn insert(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_METADATA_ID, self.id.clone());
        headers.insert(PEER_METADATA, self.value.clone());
    }
}

fn tcp_frame(node: &NodeMetadata) -> bytes::Bytes {
    let any = PbAny {
        type_url: STRUCT_TYPE_URL.to_owned(),
        value: node.encode_struct(),
    };
    let payload = prost::Message::encode_to_vec(&any);
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&TCP_MAGIC.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.into()
}

/// Removes both metadata headers from `headers` and returns the peer's workload when the
/// metadata decodes and is believable: the peer authenticated as `peer` (mTLS) and the
/// namespace it claims is that identity's namespace. The workload's principal is `peer`.
///
/// A peer sends the same value on every request, so what a (value, peer) pair decodes
/// to is kept (up to [`VERIFIED_LIMIT`] pairs; beyond, values are decoded each time):
/// after the first request a peer costs a lookup, no decoding or allocation. Istio's
/// proxies keep decoded peer metadata by its id in the same way.
pub fn take(headers: &mut HeaderMap, peer: Option<&Identity>) -> Option<Arc<Workload>> {
    if !carries_metadata(headers) {
        return None;
    }
    let value = headers.remove(PEER_METADATA);
    headers.remove(PEER_METADATA_ID);
    let value = value?;
    let peer = peer?;
    let key = (value, peer.clone());
    if let Some(known) = VERIFIED.load().get(&key) {
        return known.clone();
    }
    let verified = NodeMetadata::decode(key.0.as_bytes())
        .and_then(|node| verify(node, peer))
        .map(Arc::new);
    VERIFIED.rcu(|map| {
        if map.len() >= VERIFIED_LIMIT {
            return Arc::clone(map);
        }
        let mut map = HashMap::clone(map);
        map.insert(key.clone(), verified.clone());
        Arc::new(map)
    });
    verified
}

/// Whether `headers` has either metadata header. A request from outside the mesh, or
/// one whose metadata an earlier layer took, has neither, and a hashed removal of an
/// absent name costs as much as of a present one: one pass over the names (no
/// hashing) answers first.
pub fn carries_metadata(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k == PEER_METADATA || k == PEER_METADATA_ID)
}

/// Bound on the (metadata value, peer identity) pairs [`take`] keeps.
pub const VERIFIED_LIMIT: usize = 4096;

/// Keyed by the whole metadata value (hundreds of bytes), so hashed with foldhash
/// (randomly seeded per process) rather than SipHash: a lookup costs a tenth as much.
type Verified =
    HashMap<(HeaderValue, Identity), Option<Arc<Workload>>, foldhash::fast::RandomState>;

static VERIFIED: LazyLock<ArcSwap<Verified>> = LazyLock::new(ArcSwap::default);

/// The workload `node` describes, when its namespace is that of `peer`'s SPIFFE identity.
pub fn verify(node: NodeMetadata, peer: &Identity) -> Option<Workload> {
    if peer.namespace() != Some(node.namespace.as_str()) {
        tracing::debug!(
            claimed = %node.namespace,
            %peer,
            "peer metadata ignored: namespace differs from the peer's identity"
        );
        return None;
    }
    Some(node.workload().with_principal(peer.clone()))
}

/// The verified workload of a request's peer ([`take`]), left in the request extensions
/// by the layer that removed the metadata headers (the inbound edge's sanitizing, or the
/// telemetry layer itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerWorkload(pub Arc<Workload>);

/// Moves a request's peer metadata from its headers into a [`PeerWorkload`] extension
/// when the connection's verified [`PeerIdentity`] vouches for it; the headers are
/// removed either way.
pub fn take_request<B>(req: &mut http::Request<B>) {
    if !carries_metadata(req.headers()) {
        return;
    }
    let peer = req.extensions().get::<PeerIdentity>().map(|p| p.0.clone());
    if let Some(w) = take(req.headers_mut(), peer.as_ref()) {
        req.extensions_mut().insert(PeerWorkload(w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    #[tokio::test]
    async fn tcp_frames_round_trip_and_bad_frames_are_refused() {
        let node = NodeMetadata::new("redis-v1", "data", "Kubernetes").label("app", "redis");
        let local = LocalMetadata::new(
            &node,
            "sidecar~10.0.0.9~redis-v1.data~data.svc.cluster.local",
        );
        let frame = local.tcp_frame().clone();
        assert_eq!(&frame[..4], &[0x3D, 0x23, 0x04, 0x67]);
        assert_eq!(
            u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize,
            frame.len() - 8
        );
        // What follows the frame on the connection is left unread.
        let mut stream = [frame.as_ref(), b"PING\r\n"].concat();
        let mut reader = stream.as_slice();
        let read = read_tcp_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!(read.workload().canonical_service, "redis");
        assert_eq!(reader, b"PING\r\n");

        stream[0] = 0;
        assert!(matches!(
            read_tcp_frame(&mut stream.as_slice()).await,
            Err(TcpExchangeError::NotAFrame)
        ));
        let mut huge = frame.to_vec();
        huge[4..8].copy_from_slice(&(1u32 << 30).to_be_bytes());
        assert!(matches!(
            read_tcp_frame(&mut huge.as_slice()).await,
            Err(TcpExchangeError::TooLarge(_))
        ));
        assert!(matches!(
            read_tcp_frame(&mut &frame[..20]).await,
            Err(TcpExchangeError::Io(_))
        ));
    }

    #[test]
    fn encoding_round_trips_and_fills_canonical_labels() {
        let node = NodeMetadata::new("ratings-v1", "bookinfo", "east")
            .label("app", "ratings")
            .label("version", "v1");
        let decoded = NodeMetadata::decode(node.encode().as_bytes()).unwrap();
        assert_eq!(decoded.namespace, "bookinfo");
        assert_eq!(decoded.labels[CANONICAL_NAME_LABEL], "ratings");
        assert_eq!(decoded.labels[CANONICAL_REVISION_LABEL], "v1");
        assert_eq!(
            decoded.owner,
            "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/ratings-v1"
        );
        let w = decoded.workload();
        assert_eq!(w.cluster, "east");
        assert_eq!(w.canonical_service, "ratings");
    }

    #[test]
    fn canonical_labels_fall_back_like_the_injector() {
        let mut labels = BTreeMap::new();
        assert_eq!(canonical(&labels, "w"), ("w".into(), "latest".into()));
        labels.insert("app".into(), "a".into());
        labels.insert("version".into(), "v3".into());
        assert_eq!(canonical(&labels, "w"), ("a".into(), "v3".into()));
        labels.insert(CANONICAL_NAME_LABEL.into(), "c".into());
        labels.insert(CANONICAL_REVISION_LABEL.into(), "r".into());
        assert_eq!(canonical(&labels, "w"), ("c".into(), "r".into()));
    }

    #[test]
    fn garbage_and_other_namespaces_are_ignored_and_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(PEER_METADATA, HeaderValue::from_static("!!not base64"));
        h.insert(PEER_METADATA_ID, HeaderValue::from_static("x"));
        let peer = id("spiffe://cluster.local/ns/a/sa/s");
        assert!(take(&mut h, Some(&peer)).is_none());
        assert!(h.is_empty());
        let local = LocalMetadata::new(&NodeMetadata::new("w", "b", "c"), "id");
        local.insert(&mut h);
        assert!(take(&mut h, Some(&peer)).is_none(), "claims namespace b");
        local.insert(&mut h);
        assert!(take(&mut h, None).is_none(), "plaintext");
        assert!(h.is_empty());
    }

    #[test]
    fn either_header_alone_is_found_and_removed() {
        let peer = id("spiffe://cluster.local/ns/a/sa/s");
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("a"));
        assert!(!carries_metadata(&h));
        assert!(take(&mut h, Some(&peer)).is_none());
        assert_eq!(h.len(), 1, "other headers stay");
        h.insert(PEER_METADATA_ID, HeaderValue::from_static("x"));
        assert!(carries_metadata(&h));
        assert!(take(&mut h, Some(&peer)).is_none());
        assert!(!carries_metadata(&h));
        let mut req = http::Request::new(());
        req.headers_mut()
            .insert(PEER_METADATA_ID, HeaderValue::from_static("x"));
        take_request(&mut req);
        assert!(req.headers().is_empty());
        assert!(req.extensions().get::<PeerWorkload>().is_none());
    }

    #[test]
    fn unpadded_values_decode() {
        let enc = NodeMetadata::new("w", "ns", "c").encode();
        let trimmed = enc.trim_end_matches('=');
        assert!(NodeMetadata::decode(trimmed.as_bytes()).is_some());
    }
}
