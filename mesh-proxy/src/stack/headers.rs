//! Request and response headers at the stacks' edges: hop-by-hop removal (RFC 9110
//! §7.6.1), identity and proxy-internal headers a client must not set, header names
//! with `_`, `X-Forwarded-Client-Cert` ([`ForwardClientCertDetails`]), `X-Forwarded-For`
//! at the edge, and internal headers an upstream must not show an external client.
//!
//! # Header trust
//!
//! - Identity and proxy-internal request headers from a client (`x-forwarded-client-cert`,
//!   `x-envoy-*`, `x-istio-*`, `l5d-*`, and every name in `extra_untrusted`) are removed at
//!   the inbound listener and the gateway before any other layer runs; the ones the proxy
//!   sets are set after that, from the verified connection only.
//! - `X-Forwarded-Client-Cert` follows Envoy's `forward_client_cert_details`: the sidecar's
//!   inbound listener uses `SANITIZE_SET` (as Istio configures it), so the application
//!   sees exactly `By=<own SPIFFE ID>;Hash=<hex SHA-256 of the caller's leaf
//!   certificate>;Subject="";URI=<caller's SPIFFE ID>` for an mTLS caller and no XFCC at
//!   all otherwise. Mesh SVIDs have an empty subject, hence `Subject=""`; a non-SPIFFE
//!   client certificate at a MUTUAL gateway server yields `By` and `Hash` only. The
//!   gateway's mode is `gatewayTopology.forwardClientCertDetails` (default
//!   `SANITIZE_SET`, as Istio).
//! - `X-Forwarded-For`: the gateway appends the address of the peer it accepted the
//!   connection from (Envoy `use_remote_address: true` at the edge); what a client wrote
//!   before stays, and `numTrustedProxies` (Envoy `xff_num_trusted_hops`) decides how
//!   many of the rightmost entries are believed when the client's address is taken from
//!   it (`remoteIpBlocks`).
//! - `TE` (RFC 9110 §10.1.4): a hop-by-hop field; only the `trailers` member is
//!   forwarded (as `TE: trailers`, which gRPC needs); transfer codings a client asks
//!   for are this hop's business and are never passed on.
//! - Responses at the gateway lose `x-envoy-*`, `x-istio-*`, `l5d-*` and
//!   `x-forwarded-client-cert` set by the mesh behind it: an external client never sees
//!   peer metadata or identities.
//!
//! # Well-formed HTTP/2 requests (RFC 9113 §8.1-8.3)
//!
//! The h2 codec already resets a stream (PROTOCOL_ERROR) for a missing or empty
//! `:path`, a missing `:scheme`, connection-specific fields, `te` other than `trailers`,
//! trailers without END_STREAM and (with the workspace's pinned patch,
//! `third_party/h2`) trailers carrying pseudo-header fields. [`Sanitize`] refuses the rest with 400 before any
//! layer runs: an `:authority` with userinfo or not `host[:port]`, a `:scheme` other than
//! `http`/`https`, a `host` field that disagrees with `:authority`, a field value with
//! leading or trailing whitespace (and, for a codec that lets them through,
//! connection-specific fields and `te`). [`CheckedTrailers`] ends a request body whose
//! trailers carry `content-length`, `host`, `te`, connection-specific fields or padded
//! values, so they are never forwarded. One gap is h2's: it drops `:scheme` when a
//! request has no `:authority`.
//!
//! # Layer placement
//!
//! [`Sanitize`] is the outermost layer of every stack that faces a client (outbound,
//! inbound, gateway); [`strip_hop_by_hop`] runs again in the HTTP client on the way out
//! and on every response.

use http::header::{self, HeaderMap, HeaderName};
use mesh_core::BoxError;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies must not forward.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `name` is one of [`HOP_BY_HOP`] or `upgrade`.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers, including those named in `Connection`. `Upgrade` is kept
/// (and `Connection: upgrade` re-added) only for a WebSocket upgrade request; `Upgrade:
/// h2c` is never forwarded (h2c smuggling). `TE: trailers` survives.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names (no hashing) decides,
    // instead of a lookup for each hop-by-hop name. A name listed in `Connection` needs
    // `Connection` itself to be present.
    if !headers.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        if name != header::UPGRADE || !websocket {
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if websocket {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Whether `name` is an identity or proxy-internal header: `x-forwarded-client-cert`,
/// `x-envoy-*` (the metadata exchange's `x-envoy-peer-metadata` and
/// `x-envoy-peer-metadata-id` among them), `x-istio-*`, `l5d-*`.
pub fn is_internal(name: &str) -> bool {
    name == "x-forwarded-client-cert"
        || name.starts_with("x-envoy-")
        || name.starts_with("x-istio-")
        || name.starts_with("l5d-")
}

/// Removes identity and proxy-internal headers a client must not be able to set
/// (SECURITY.md §2.2, [`is_internal`]).
pub fn strip_untrusted(headers: &mut HeaderMap) {
    strip_where(headers, is_internal);
}

fn strip_where(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| doomed(k.as_str()))
        .cloned()
        .collect();
    for k in doomed {
        headers.remove(k);
    }
}

/// Envoy's `forward_client_cert_details` (Istio's `forwardClientCertDetails`): what
/// happens to `X-Forwarded-Client-Cert`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ForwardClientCertDetails {
    /// Never forwarded.
    Sanitize,
    /// Forwarded as the client sent it, on mTLS connections only.
    ForwardOnly,
    /// On mTLS connections, this hop's element is appended; otherwise removed.
    AppendForward,
    /// On mTLS connections, replaced by this hop's element; otherwise removed.
    #[default]
    SanitizeSet,
    /// Always forwarded as the client sent it.
    AlwaysForwardOnly,
}

impl ForwardClientCertDetails {
    /// Parses Istio's names (`SANITIZE`, `FORWARD_ONLY`, `APPEND_FORWARD`,
    /// `SANITIZE_SET`, `ALWAYS_FORWARD_ONLY`).
    pub fn from_istio(name: &str) -> Option<Self> {
        Some(match name {
            "SANITIZE" => Self::Sanitize,
            "FORWARD_ONLY" => Self::ForwardOnly,
            "APPEND_FORWARD" => Self::AppendForward,
            "SANITIZE_SET" => Self::SanitizeSet,
            "ALWAYS_FORWARD_ONLY" => Self::AlwaysForwardOnly,
            _ => return None,
        })
    }
}

/// The XFCC element for the client of `req`'s connection, built only from what the
/// handshake verified; `None` when the client presented no certificate.
fn xfcc_element<B>(req: &http::Request<B>, by: Option<&str>) -> Option<String> {
    let hash = req.extensions().get::<mesh_tls::PeerCertificateHash>()?;
    let peer = req
        .extensions()
        .get::<mesh_core::extensions::PeerIdentity>()
        .map(|p| p.0.as_str());
    Some(build_xfcc_element(hash, peer, by))
}

/// The last XFCC value this thread built and what it was built from. Every request of
/// one connection has the same element (its certificate, its identity, this edge), so
/// the requests of a connection share one value (a reference count each) instead of
/// each building and hex-encoding its own; requests of other connections replace it.
struct XfccMemo {
    hash: mesh_tls::PeerCertificateHash,
    peer: Option<mesh_core::Identity>,
    by: Option<String>,
    value: http::HeaderValue,
}

thread_local! {
    static LAST_XFCC: std::cell::RefCell<Option<XfccMemo>> = const { std::cell::RefCell::new(None) };
}

/// [`xfcc_element`] as a header value, shared with the connection's earlier requests
/// ([`XfccMemo`]).
fn xfcc_value<B>(req: &http::Request<B>, by: Option<&str>) -> Option<http::HeaderValue> {
    let hash = *req.extensions().get::<mesh_tls::PeerCertificateHash>()?;
    let peer = req
        .extensions()
        .get::<mesh_core::extensions::PeerIdentity>()
        .map(|p| &p.0);
    LAST_XFCC.with_borrow_mut(|memo| {
        if let Some(m) = memo
            && m.hash == hash
            && m.peer.as_ref() == peer
            && m.by.as_deref() == by
        {
            return Some(m.value.clone());
        }
        let element = build_xfcc_element(&hash, peer.map(mesh_core::Identity::as_str), by);
        let value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()?;
        *memo = Some(XfccMemo {
            hash,
            peer: peer.cloned(),
            by: by.map(str::to_owned),
            value: value.clone(),
        });
        Some(value)
    })
}

fn build_xfcc_element(
    hash: &mesh_tls::PeerCertificateHash,
    peer: Option<&str>,
    by: Option<&str>,
) -> String {
    const SUBJECT_URI: &str = ";Subject=\"\";URI=";
    // Sized exactly, so that the header value takes the buffer without copying it.
    let len = by.map_or(0, |b| "By=".len() + b.len() + 1)
        + "Hash=".len()
        + 64
        + peer.map_or(0, |p| SUBJECT_URI.len() + p.len());
    let mut out = String::with_capacity(len);
    if let Some(by) = by {
        out.push_str("By=");
        out.push_str(by);
        out.push(';');
    }
    out.push_str("Hash=");
    hash.write_hex(&mut out);
    if let Some(peer) = peer {
        out.push_str(SUBJECT_URI);
        out.push_str(peer);
    }
    out
}

/// `X-Forwarded-Client-Cert`, a constant: `from_static` called at run time checks the
/// name each time.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Applies `mode` to `req`'s XFCC; `present` is false only when the request has none.
fn forward_client_cert<B>(
    req: &mut http::Request<B>,
    mode: ForwardClientCertDetails,
    by: Option<&str>,
    present: bool,
) {
    use ForwardClientCertDetails as M;
    let mtls = req
        .extensions()
        .get::<mesh_tls::PeerCertificateHash>()
        .is_some();
    let name = XFCC;
    match mode {
        M::AlwaysForwardOnly => {}
        M::ForwardOnly if mtls => {}
        M::AppendForward if mtls => {
            let element = xfcc_element(req, by);
            let mut value = req
                .headers()
                .get_all(&name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(element.as_deref().unwrap_or_default());
            set(req.headers_mut(), name, &value);
        }
        M::SanitizeSet if mtls => match xfcc_value(req, by) {
            Some(v) => {
                req.headers_mut().insert(name, v);
            }
            None => {
                req.headers_mut().remove(name);
            }
        },
        _ if present => {
            req.headers_mut().remove(name);
        }
        _ => {}
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    match http::HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Appends the connection's peer address to `X-Forwarded-For` (one field, entries
/// joined with `, `).
fn append_forwarded_for<B>(req: &mut http::Request<B>) {
    let Some(info) = req
        .extensions()
        .get::<mesh_core::extensions::ConnectionInfo>()
    else {
        return;
    };
    let peer = info.remote.ip().to_canonical().to_string();
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let name = XFF;
    let mut value = req
        .headers()
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer);
    set(req.headers_mut(), name, &value);
}

/// What an edge does with the headers of trust, beyond removing the internal ones.
#[derive(Clone, Debug, Default)]
pub struct EdgeHeaders {
    /// `forwardClientCertDetails`.
    pub forward_client_cert: ForwardClientCertDetails,
    /// This proxy's SPIFFE ID (XFCC `By`).
    pub own_identity: Option<String>,
    /// Append the peer address to `X-Forwarded-For` (the gateway).
    pub append_forwarded_for: bool,
    /// Remove internal headers from responses (the gateway, facing external clients).
    pub strip_response: bool,
    /// More request header names (lower case) that are identity headers here.
    pub extra_untrusted: Vec<String>,
    /// Istio's `numTrustedProxies` (for `remoteIpBlocks` behind this edge).
    pub num_trusted_proxies: usize,
}

/// Why a request line or `Host` is not well-formed (RFC 9112 §3.2, RFC 9110 §7.2), or
/// `None`. An absolute-form target's authority replaces `Host` (§3.2.2: the recipient
/// ignores `Host` then), so routing and authorization see one authority.
fn malformed_target<B>(req: &mut http::Request<B>) -> Option<&'static str> {
    if req.uri().path() == "*"
        && req.uri().authority().is_none()
        && req.method() != http::Method::OPTIONS
    {
        return Some("asterisk-form target outside OPTIONS");
    }
    if req.version() > http::Version::HTTP_11 {
        return malformed_h2(req);
    }
    // RFC 9112 §6.1: `chunked` is the only transfer coding accepted, once (anything else
    // in the list is a smuggling attempt or a coding no upstream is sent). With
    // Content-Length as well, hyper has already dropped Content-Length and reads the
    // chunked body, which is forwarded re-framed (SECURITY.md §2.3: never both).
    let codings: Vec<&[u8]> = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    if !codings.is_empty() && (codings.len() != 1 || !codings[0].eq_ignore_ascii_case(b"chunked")) {
        return Some("unsupported Transfer-Encoding");
    }
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Some("duplicate Host");
    }
    if hosts == 0 && req.version() == http::Version::HTTP_11 {
        return Some("missing Host");
    }
    if let Some(host) = req.headers().get(header::HOST)
        && !valid_authority(host.as_bytes())
    {
        return Some("invalid Host");
    }
    if let Some(authority) = req.uri().authority() {
        // Parsed already with the request target: only the characters and the port
        // are left to check.
        if !authority_chars(authority.as_str().as_bytes()) || !has_valid_port(authority) {
            return Some("invalid authority in the request target");
        }
        // The authority wins over Host; a Host that says the same stays as it is.
        let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
        if host != Some(authority.as_str().as_bytes())
            && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    None
}

/// Why an HTTP/2 (or HTTP/3) request is not well-formed (RFC 9113 §8.1-8.3), or
/// `None`: the checks the codec leaves to the application. An `:authority` with
/// userinfo or anything but `host[:port]`, a `:scheme` other than `http`/`https`, a
/// `host` field that disagrees with `:authority` (§8.3.1), a field value with leading
/// or trailing whitespace (§8.2.1), and, should the codec let them through,
/// connection-specific fields and `te` other than `trailers` (§8.2.2). A request
/// without `:authority` has its `host` checked as in HTTP/1.1.
fn malformed_h2<B>(req: &http::Request<B>) -> Option<&'static str> {
    let connect = req.method() == http::Method::CONNECT;
    match req.uri().scheme_str() {
        None | Some("http" | "https") => {}
        Some(_) if connect => {}
        Some(_) => return Some("unknown :scheme"),
    }
    let headers = req.headers();
    if let Some(authority) = req.uri().authority() {
        if !authority_chars(authority.as_str().as_bytes()) || !has_valid_port(authority) {
            return Some("invalid :authority");
        }
        // §8.3.1: a `host` field that differs from `:authority` makes the request
        // malformed; the comparison is the case-insensitive one of the host name.
        if headers.get_all(header::HOST).iter().any(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Some("host disagrees with :authority");
        }
    } else {
        let hosts = headers.get_all(header::HOST).iter().count();
        if hosts > 1 {
            return Some("duplicate Host");
        }
        if let Some(host) = headers.get(header::HOST)
            && !valid_authority(host.as_bytes())
        {
            return Some("invalid Host");
        }
    }
    for (name, value) in headers {
        let v = value.as_bytes();
        if edge_whitespace(v) {
            return Some("field value with leading or trailing whitespace");
        }
        if is_connection_specific(name) {
            return Some("connection-specific header field");
        }
        if name == header::TE && v != b"trailers" {
            return Some("te other than trailers");
        }
    }
    None
}

/// A field value that starts or ends with SP or HTAB (RFC 9113 §8.2.1 makes it
/// malformed; HTTP/1 parsers trim it).
fn edge_whitespace(v: &[u8]) -> bool {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    v.first().is_some_and(ws) || v.last().is_some_and(ws)
}

/// Fields that are meaningful only on one HTTP/1 connection and make an HTTP/2 message
/// malformed (RFC 9113 §8.2.2).
fn is_connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Why a trailer section may not be forwarded, or `None`: fields that frame or route a
/// message (`content-length`, `transfer-encoding`, `host`, RFC 9110 §6.5.1),
/// connection-specific fields, and values with leading or trailing whitespace
/// (RFC 9113 §8.1, §8.2.1).
fn bad_trailers(trailers: &HeaderMap) -> Option<&'static str> {
    trailers.iter().find_map(|(name, value)| {
        let v = value.as_bytes();
        if name == header::CONTENT_LENGTH || name == header::HOST || name == header::TE {
            Some("framing or routing field in trailers")
        } else if is_connection_specific(name) {
            Some("connection-specific field in trailers")
        } else if edge_whitespace(v) {
            Some("trailer value with leading or trailing whitespace")
        } else {
            None
        }
    })
}

/// A request body whose trailers are checked before they go on ([`bad_trailers`]): a
/// trailer section that may not be forwarded ends the body with
/// [`BadRequest`](crate::respond::BadRequest) instead, so the upstream's stream is
/// reset (or its HTTP/1 body cut) and never sees those trailers, and the client gets a
/// 400 if it has no answer yet.
#[pin_project::pin_project]
pub struct CheckedTrailers<B> {
    #[pin]
    inner: B,
}

impl<B> CheckedTrailers<B> {
    /// Checks the trailers of `inner`.
    pub fn new(inner: B) -> Self {
        Self { inner }
    }
}

impl<B> http_body::Body for CheckedTrailers<B>
where
    B: http_body::Body<Error = BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let polled = std::task::ready!(self.project().inner.poll_frame(cx));
        if let Some(Ok(frame)) = &polled
            && let Some(why) = frame.trailers_ref().and_then(bad_trailers)
        {
            tracing::debug!(reason = why, "malformed request trailers");
            return std::task::Poll::Ready(Some(Err(Box::new(crate::respond::BadRequest(why)))));
        }
        std::task::Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `uri-host [ ":" port ]` without userinfo or whitespace.
fn valid_authority(value: &[u8]) -> bool {
    if plain_host_port(value) {
        return true;
    }
    authority_chars(value)
        && std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| has_valid_port(&a))
}

/// A DNS name or IPv4 address with an optional decimal port (`payment-service:8080`),
/// which is how nearly every `Host` looks: a valid authority, recognised without
/// [`http::uri::Authority`]'s parse, which copies the value. Anything else (brackets,
/// percent-encoding, other characters) is left to that parse.
fn plain_host_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(i) => (&value[..i], Some(&value[i + 1..])),
        None => (value, None),
    };
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(|p| {
            (1..=5).contains(&p.len())
                && p.iter().all(u8::is_ascii_digit)
                && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535
        })
}

/// Not empty, printable ASCII, no whitespace and no userinfo (`@`).
fn authority_chars(value: &[u8]) -> bool {
    !value.is_empty()
        && !value
            .iter()
            .any(|&b| b == b'@' || b.is_ascii_whitespace() || !(0x21..0x7f).contains(&b))
}

/// A `:` after the host (outside IPv6 brackets) must start a decimal port.
fn has_valid_port(a: &http::uri::Authority) -> bool {
    let after_host = a.as_str().rsplit_once(']').map_or(a.as_str(), |(_, p)| p);
    !after_host.contains(':') || a.port_u16().is_some()
}

/// The answer to `OPTIONS *` (RFC 9110 §9.3.7, a question about the server rather than
/// a resource): 200 with the methods the proxy forwards, given locally at every edge.
fn options_asterisk() -> http::Response<mesh_core::body::BoxBody> {
    let mut res = http::Response::new(mesh_core::body::empty());
    res.headers_mut().insert(
        header::ALLOW,
        http::HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"),
    );
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, http::HeaderValue::from_static("0"));
    res
}

/// Rejects header names containing `_` (SECURITY.md: upstreams treat `_` as `-`).
pub fn has_underscore_header(headers: &HeaderMap) -> bool {
    headers.keys().any(has_underscore)
}

fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().contains('_')
}

/// What [`Sanitize`] needs to know about a request's header names, found in one pass
/// over them (no hashing): most requests carry none of the headers it removes, and a
/// hashed lookup or removal of an absent name costs as much as of a present one.
#[derive(Clone, Copy, Debug, Default)]
struct NameScan {
    underscore: bool,
    internal: bool,
    xfcc: bool,
}

impl NameScan {
    fn of(headers: &HeaderMap) -> Self {
        let mut scan = Self::default();
        for name in headers.keys() {
            scan.underscore |= has_underscore(name);
            if is_internal(name.as_str()) {
                scan.internal = true;
                scan.xfcc |= name == XFCC;
            }
        }
        scan
    }
}

/// Checks and cleans request headers before the rest of the stack: header names with
/// `_` are refused (400); an HTTP/1.1 request without `Host`, with two, or with a `Host`
/// or absolute-form authority carrying userinfo, whitespace or anything that is not
/// `host[:port]` is refused (400); an absolute-form target's authority becomes `Host`;
/// `OPTIONS *` is answered here (200 with `Allow`); `CONNECT` requests get 404 `NR` (no
/// route allows them), and, at
/// the edges that face untrusted clients, identity and internal headers are removed.
#[derive(Clone, Debug)]
pub struct Sanitize<S> {
    inner: S,
    strip_untrusted: bool,
    peer_metadata: bool,
    edge: std::sync::Arc<EdgeHeaders>,
}

impl<S> Sanitize<S> {
    /// Wraps `inner`; `strip_untrusted` at the gateway (and the inbound listener, which
    /// uses [`Sanitize::inbound`]).
    pub fn new(inner: S, strip_untrusted: bool) -> Self {
        Self {
            inner,
            strip_untrusted,
            peer_metadata: false,
            edge: std::sync::Arc::new(EdgeHeaders {
                forward_client_cert: ForwardClientCertDetails::Sanitize,
                ..EdgeHeaders::default()
            }),
        }
    }

    /// Sets what happens to XFCC, `X-Forwarded-For` and response headers at this edge.
    pub fn edge(mut self, edge: EdgeHeaders) -> Self {
        self.edge = std::sync::Arc::new(edge);
        self
    }

    /// The inbound listener's sanitizing: before the untrusted headers go, the peer's
    /// metadata (`x-envoy-peer-metadata`) is kept as a request extension when the
    /// connection's verified identity vouches for it
    /// ([`mesh_telemetry::exchange::take_request`]), for the telemetry layer.
    pub fn inbound(inner: S) -> Self {
        Self {
            inner,
            strip_untrusted: true,
            peer_metadata: true,
            edge: std::sync::Arc::new(EdgeHeaders::default()),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Sanitize<S>
where
    S: tower::Service<
            http::Request<mesh_core::body::BoxBody>,
            Response = http::Response<mesh_core::body::BoxBody>,
            Error = BoxError,
        >,
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<mesh_core::body::BoxBody>;
    type Error = BoxError;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Self::Response, BoxError>>,
        StripResponse<S::Future>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let scan = NameScan::of(req.headers());
        if scan.underscore {
            return Either::Left(std::future::ready(Ok(crate::respond::bad_request(
                "header name with underscore",
            ))));
        }
        if let Some(why) = malformed_target(&mut req) {
            return Either::Left(std::future::ready(Ok(crate::respond::bad_request(why))));
        }
        if req.method() == http::Method::OPTIONS
            && req.uri().path() == "*"
            && req.uri().authority().is_none()
        {
            return Either::Left(std::future::ready(Ok(options_asterisk())));
        }
        if req.method() == http::Method::CONNECT {
            // No route allows CONNECT (Istio enables only WebSocket upgrades): Envoy's
            // answer is 404 `NR`; nothing is forwarded.
            let no_route: mesh_core::error::BoxError = Box::new(mesh_core::error::NoRoute);
            return Either::Left(std::future::ready(Ok(crate::respond::error_response(
                &no_route,
            ))));
        }
        if self.peer_metadata {
            mesh_telemetry::exchange::take_request(&mut req);
        }
        if self.strip_untrusted {
            let extra = &self.edge.extra_untrusted;
            let keep_xfcc = self.edge.forward_client_cert != ForwardClientCertDetails::Sanitize;
            if scan.internal || !extra.is_empty() {
                strip_where(req.headers_mut(), |k| {
                    (is_internal(k) && !(keep_xfcc && k == XFCC)) || extra.iter().any(|e| e == k)
                });
            }
            forward_client_cert(
                &mut req,
                self.edge.forward_client_cert,
                self.edge.own_identity.as_deref(),
                scan.xfcc && keep_xfcc,
            );
        }
        if self.edge.append_forwarded_for {
            append_forwarded_for(&mut req);
        }
        // A body the client frames badly (a bad chunk line, a truncated chunk, data past
        // the chunk size) fails while it is forwarded: the answer is then 400 `DPE`,
        // as for every other malformed request, not an upstream failure. A body over a
        // stream limit keeps its own answer (413, 408).
        // Trailers that may not be forwarded end the body the same way.
        let req = req.map(|body| {
            mesh_core::body::boxed(CheckedTrailers::new(http_body_util::BodyExt::map_err(
                body,
                |e| {
                    let e: BoxError = e.into();
                    if crate::stack::client::is_stream_limit(e.as_ref()) {
                        return e;
                    }
                    tracing::debug!(error = %e, "malformed request body");
                    Box::new(crate::respond::BadRequest("malformed request body")) as BoxError
                },
            )))
        });
        Either::Right(StripResponse {
            inner: self.inner.call(req),
            strip: self.edge.strip_response,
        })
    }
}

/// The response future of [`Sanitize`]: removes internal headers from the response
/// when the edge faces external clients.
#[pin_project::pin_project]
pub struct StripResponse<F> {
    #[pin]
    inner: F,
    strip: bool,
}

impl<F> std::future::Future for StripResponse<F>
where
    F: std::future::Future<Output = Result<http::Response<mesh_core::body::BoxBody>, BoxError>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let strip = *this.strip;
        this.inner.poll(cx).map_ok(|mut res| {
            if strip {
                strip_untrusted(res.headers_mut());
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn host_values_are_checked_as_authorities() {
        let valid = [
            "example.com",
            "payment-service:8080",
            "127.0.0.1:80",
            "[::1]:443",
            "[::1]",
        ];
        let invalid = [
            "",
            "user@example.com",
            "exa mple.com",
            "example.com:http",
            "example.com:",
            "example.com:99999",
            "[::1",
            "example.com/path",
            "example.com\t",
        ];
        for (values, expected) in [(&valid[..], true), (&invalid[..], false)] {
            for v in values {
                assert_eq!(valid_authority(v.as_bytes()), expected, "{v:?}");
            }
        }
    }

    #[test]
    fn plain_host_port_accepts_only_what_the_full_parse_accepts() {
        let full = |v: &str| {
            authority_chars(v.as_bytes())
                && v.parse::<http::uri::Authority>()
                    .is_ok_and(|a| has_valid_port(&a))
        };
        let values = [
            "a",
            "a.b-c",
            "-",
            ".",
            "127.0.0.1",
            "payment-service:8080",
            "a:0",
            "a:00080",
            "a:65535",
            "a:65536",
            "a:99999",
            "a:123456",
            "a:",
            ":80",
            "a:8a",
            "a::80",
            "a_b",
            "[::1]:80",
            "a%20b",
            "a@b",
        ];
        let mut fast = 0;
        for v in values {
            if plain_host_port(v.as_bytes()) {
                fast += 1;
                assert!(full(v), "{v:?} passes the fast check only");
            }
            assert_eq!(valid_authority(v.as_bytes()), full(v), "{v:?}");
        }
        assert_eq!(fast, 9, "the values the fast check recognises");
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[("x-keep", "yes"), (name, "gzip")]);
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert_eq!(h["x-keep"], "yes");
        }
        let mut plain = map(&[("x-keep", "yes"), ("content-length", "3")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2, "{plain:?}");
    }

    #[test]
    fn websocket_upgrade_is_kept() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn identity_and_internal_headers_from_outside_are_removed() {
        let mut h = map(&[
            ("x-forwarded-client-cert", "By=spiffe://x"),
            ("x-envoy-original-path", "/public"),
            ("x-envoy-max-retries", "100"),
            ("x-istio-attributes", "a"),
            (
                "x-envoy-peer-metadata",
                "ChgKBE5BTUUSEBoOZm9yZ2VkLXdvcmtsb2Fk",
            ),
            ("x-envoy-peer-metadata-id", "sidecar~~forged"),
            ("x-request-id", "keep"),
        ]);
        strip_untrusted(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn one_pass_over_the_names_finds_what_sanitize_removes() {
        let scan = NameScan::of(&map(&[("host", "a"), ("x-request-id", "1")]));
        assert!(!scan.underscore && !scan.internal && !scan.xfcc);
        let scan = NameScan::of(&map(&[("x-envoy-peer-metadata-id", "x"), ("a_b", "1")]));
        assert!(scan.underscore && scan.internal && !scan.xfcc);
        let scan = NameScan::of(&map(&[("x-forwarded-client-cert", "By=x")]));
        assert!(scan.internal && scan.xfcc && !scan.underscore);
        let scan = NameScan::of(&map(&[("l5d-x", "1")]));
        assert!(scan.internal && !scan.xfcc);
    }

    #[test]
    fn underscore_headers_are_detected() {
        assert!(has_underscore_header(&map(&[("x_envoy_path", "/")])));
        assert!(!has_underscore_header(&map(&[("x-envoy-path", "/")])));
    }

    fn mtls_request(xfcc: &[&str]) -> http::Request<()> {
        let mut req = http::Request::new(());
        for v in xfcc {
            req.headers_mut()
                .append("x-forwarded-client-cert", HeaderValue::from_str(v).unwrap());
        }
        req.extensions_mut()
            .insert(mesh_tls::PeerCertificateHash::of(b"abc"));
        req.extensions_mut()
            .insert(mesh_core::extensions::PeerIdentity(
                mesh_core::Identity::parse("spiffe://cluster.local/ns/a/sa/caller").unwrap(),
            ));
        req
    }

    #[test]
    fn the_shared_xfcc_value_follows_the_connection_it_is_for() {
        let with = |peer: &str, cert: &[u8]| {
            let mut req = http::Request::new(());
            req.extensions_mut()
                .insert(mesh_tls::PeerCertificateHash::of(cert));
            req.extensions_mut()
                .insert(mesh_core::extensions::PeerIdentity(
                    mesh_core::Identity::parse(peer).unwrap(),
                ));
            req
        };
        let a = with("spiffe://cluster.local/ns/a/sa/one", b"one");
        let b = with("spiffe://cluster.local/ns/a/sa/two", b"two");
        let a_other_cert = with("spiffe://cluster.local/ns/a/sa/one", b"rotated");
        let by = Some("spiffe://cluster.local/ns/a/sa/me");
        // Alternating connections on one thread: each request gets its own element,
        // whatever the previous request left in the memo.
        for _ in 0..2 {
            for (req, by) in [(&a, by), (&b, by), (&a_other_cert, by), (&a, None)] {
                let value = xfcc_value(req, by).unwrap();
                assert_eq!(value.to_str().unwrap(), xfcc_element(req, by).unwrap());
            }
        }
        // The same connection again: the value shares the first one's bytes.
        let first = xfcc_value(&a, by).unwrap();
        let second = xfcc_value(&a, by).unwrap();
        assert_eq!(first.as_bytes().as_ptr(), second.as_bytes().as_ptr());
        assert!(
            xfcc_value(&http::Request::new(()), by).is_none(),
            "no certificate"
        );
    }

    #[test]
    fn forward_client_cert_details_modes_follow_envoy() {
        use ForwardClientCertDetails as M;
        // SHA-256("abc"), lower-case hex as Envoy writes it.
        let own = "By=spiffe://cluster.local/ns/a/sa/me;Hash=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad;Subject=\"\";URI=spiffe://cluster.local/ns/a/sa/caller";
        let by = Some("spiffe://cluster.local/ns/a/sa/me");
        let xfcc = |mode, mtls: bool| {
            let mut req = mtls_request(&["By=x", "By=y"]);
            if !mtls {
                req.extensions_mut().clear();
            }
            forward_client_cert(&mut req, mode, by, true);
            let v: Vec<String> = req
                .headers()
                .get_all("x-forwarded-client-cert")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            v.join(" | ")
        };
        assert_eq!(xfcc(M::SanitizeSet, true), own);
        assert_eq!(xfcc(M::SanitizeSet, false), "");
        assert_eq!(xfcc(M::AppendForward, true), format!("By=x,By=y,{own}"));
        assert_eq!(xfcc(M::AppendForward, false), "");
        assert_eq!(xfcc(M::ForwardOnly, true), "By=x | By=y");
        assert_eq!(xfcc(M::ForwardOnly, false), "");
        assert_eq!(xfcc(M::AlwaysForwardOnly, false), "By=x | By=y");
        assert_eq!(xfcc(M::Sanitize, true), "");
        for name in [
            "SANITIZE",
            "FORWARD_ONLY",
            "APPEND_FORWARD",
            "SANITIZE_SET",
            "ALWAYS_FORWARD_ONLY",
        ] {
            assert!(ForwardClientCertDetails::from_istio(name).is_some());
        }
        assert!(ForwardClientCertDetails::from_istio("sanitize").is_none());
    }

    #[test]
    fn forwarded_for_gets_the_peer_appended() {
        let mut req = http::Request::new(());
        req.headers_mut()
            .append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        req.headers_mut()
            .append("x-forwarded-for", HeaderValue::from_static(" 2.2.2.2 "));
        req.extensions_mut()
            .insert(mesh_core::extensions::ConnectionInfo {
                remote: "[::ffff:10.0.0.9]:5".parse().unwrap(),
                local: "10.0.0.1:80".parse().unwrap(),
                security: mesh_core::extensions::ConnectionSecurity::None,
            });
        append_forwarded_for(&mut req);
        assert_eq!(
            req.headers()["x-forwarded-for"],
            "1.1.1.1, 2.2.2.2, 10.0.0.9"
        );
        assert_eq!(req.headers().get_all("x-forwarded-for").iter().count(), 1);
    }
}
