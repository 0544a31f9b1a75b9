//! Request and response extensions that carry facts from one layer to another.
//!
//! Layer crates never depend on each other; what one layer learns and another needs
//! (the peer's identity, the response flags, the upstream host) travels in the
//! request's or response's `http::Extensions` as one of these types.

use std::net::SocketAddr;

use crate::flags::ResponseFlags;
use crate::identity::Identity;

/// The verified identity of the peer of the connection a request arrived on.
///
/// Inserted once per connection by the TLS accept path; absent on plaintext connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub Identity);

/// The verified identity of the upstream server that produced a response (Envoy's
/// `%UPSTREAM_PEER_URI_SAN%`).
///
/// Inserted in the response extensions by the outbound mTLS connector; absent when the
/// upstream connection is not mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamPeerIdentity(pub Identity);

/// Istio's `connection_security_policy` of the connection a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ConnectionSecurity {
    /// Both ends presented SPIFFE certificates.
    MutualTls,
    /// Plaintext.
    None,
    /// Not determinable (always so on the outbound, `reporter="source"` side).
    #[default]
    Unknown,
}

impl ConnectionSecurity {
    /// The label value Istio uses: `mutual_tls`, `none` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
            Self::Unknown => "unknown",
        }
    }
}

/// Connection facts of the downstream connection a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The address the peer connected to: the connection's destination, which
    /// AuthorizationPolicy `destination.ip`/`ports` match. A sidecar's inbound stack sets
    /// the application's port here (Istio's original destination), not its listener's.
    pub local: SocketAddr,
    /// Whether the connection is mutual TLS.
    pub security: ConnectionSecurity,
}

/// The upstream address that produced a response (Envoy's `%UPSTREAM_HOST%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamHost(pub SocketAddr);

/// Marks a response the proxy made itself (Envoy's local reply: a 404 `NR`, a 503 `UF`,
/// an AuthorizationPolicy's 403, …), so that an outer layer can re-form it for the
/// caller, as Envoy answers a gRPC caller with a gRPC status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalReply;

/// The service a request was routed to (Envoy's upstream cluster service), told to the
/// layers outside the router.
///
/// A layer that labels requests by where they went (the gateway's telemetry: Istio's
/// `destination_service` is the routed service, not the request's `Host`) puts an empty
/// slot in the request extensions; the router's per-route service fills it with the
/// destination's fully qualified host when it takes the request. Clones share the slot;
/// the first host set wins, so retries change nothing (mirrored copies carry no
/// extensions).
#[derive(Clone, Debug, Default)]
pub struct RoutedService(std::sync::Arc<std::sync::OnceLock<std::sync::Arc<str>>>);

impl RoutedService {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `host` unless a host was recorded already.
    pub fn set(&self, host: &std::sync::Arc<str>) {
        let _ = self.0.set(std::sync::Arc::clone(host));
    }

    /// The host recorded, if any.
    pub fn get(&self) -> Option<&std::sync::Arc<str>> {
        self.0.get()
    }
}

/// The policies of the route a request matched, left by the router for the layers that
/// enforce them (the deadline and retry layers read it; absent means "no route policy").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutePolicy {
    /// The route's `timeout` (the outer deadline); `None` when unset or `0s` (disabled).
    pub timeout: Option<std::time::Duration>,
    /// The route's `retries` block as configured; `None` when the route has none (the
    /// retry layer then applies Istio's default policy, VS-51).
    pub retries: Option<std::sync::Arc<crate::config::HttpRetry>>,
    /// The route's name, for logs.
    pub route_name: Option<std::sync::Arc<str>>,
}

/// Adds `flags` to the [`ResponseFlags`] carried in `extensions` (creating them if absent).
pub fn add_response_flags(extensions: &mut http::Extensions, flags: ResponseFlags) {
    match extensions.get_mut::<ResponseFlags>() {
        Some(have) => have.insert(flags),
        None => {
            extensions.insert(flags);
        }
    }
}

/// The [`ResponseFlags`] carried in `extensions`, empty when none were added.
pub fn response_flags(extensions: &http::Extensions) -> ResponseFlags {
    extensions
        .get::<ResponseFlags>()
        .copied()
        .unwrap_or_default()
}

/// The authorization decision for a request, left by the AuthorizationPolicy layer in the
/// request extensions (seen by inner layers) and the response extensions (seen by outer
/// layers such as telemetry and the access log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDecision {
    /// Whether the request was allowed.
    pub allowed: bool,
    /// The policy rule that decided: the DENY rule that denied or the ALLOW rule that
    /// allowed. `None` when no ALLOW policy applies (allowed) or none matched (denied).
    pub policy: Option<MatchedPolicy>,
    /// The first AUDIT rule that matched: the request is marked for auditing.
    pub audit: Option<MatchedPolicy>,
    /// What the dry-run policies alone (`istio.io/dry-run: "true"`) would have decided,
    /// when any apply; never enforced.
    pub dry_run: Option<DryRunDecision>,
}

/// A policy rule named in an [`AuthzDecision`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MatchedPolicy {
    /// `<namespace>/<name>` of the policy.
    pub name: std::sync::Arc<str>,
    /// Index of the matching rule in the policy's `rules`.
    pub rule: usize,
}

/// The shadow result of dry-run policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunDecision {
    /// Whether the dry-run policies would allow the request.
    pub allowed: bool,
    /// The dry-run rule that decided, as in [`AuthzDecision::policy`].
    pub policy: Option<MatchedPolicy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_accumulate_in_extensions() {
        let mut ext = http::Extensions::new();
        assert!(response_flags(&ext).is_empty());
        add_response_flags(&mut ext, ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        add_response_flags(&mut ext, ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        assert_eq!(response_flags(&ext).to_string(), "UT,URX");
    }
}
