//! The gateway stack: requests a Gateway's server accepted, routed by the
//! VirtualServices bound to that Gateway into the mesh.
//!
//! # Layer placement
//!
//! ```text
//! [TLS server chosen by SNI: ChosenServer in the request extensions]
//!   -> sanitize (identity/internal headers from the client removed, `_` names refused;
//!      `X-Forwarded-Client-Cert` per `gatewayTopology.forwardClientCertDetails`; the
//!      peer appended to `X-Forwarded-For`; internal headers removed from responses)
//!   -> telemetry (reporter=source, destination_service = the routed service's host,
//!      else the authority) -> respond
//!   -> RequestAuthentication (JWT, [`mesh_tls::authn`]; an invalid token: 401)
//!   -> AuthorizationPolicy (the policies that select the gateway's workload,
//!      [`mesh_tls::authz`]; `remoteIpBlocks` reads the client from `X-Forwarded-For`
//!      past `numTrustedProxies`; a denied request: 403 `RBAC: access denied`)
//!   -> prepare (absolute-form authority becomes Host, hop-by-hop headers go)
//!   -> host outside the chosen server: 421 (another server of the port owns it) or
//!      404 `NR` (none does)
//!   -> `httpsRedirect` hosts: 301 to `https://`
//!   -> router (VirtualServices bound to the Gateway) -> per route and destination as on
//!      the outbound path ([`destination`](super::destination))
//! ```
//!
//! Host patterns follow the Gateway's `hosts`: `*`, `*.example.com` (one or more
//! labels), exact names, a `namespace/` prefix ignored; a host is owned by the server
//! whose patterns cover it most specifically (an exact name, then the longest wildcard
//! suffix, then `*`; ties to the first server), the order Envoy matches filter-chain
//! `server_names` in (ISTIO.md GW-11).

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use mesh_core::body::BoxBody;
use mesh_core::error::{BoxError, NoRoute};
use mesh_routing::Router;
use mesh_telemetry::{Telemetry, TelemetryLayer};
use tower::{Service, ServiceBuilder};

use super::destination::RouteService;
use super::headers::{EdgeHeaders, Sanitize};
use super::outbound::{MeshRouter, prepare, request_host};
use super::{
    HttpService, RouteFuture, authn_response, authz_response, boxed_request, boxed_response,
};
use crate::respond::{self, Respond};

/// Bound on distinct authorities in the gateway's metrics.
const AUTHORITY_LIMIT: usize = 1024;

/// Whether the Gateway host `pattern` (`ns/host` allowed) covers `host`.
/// Compared without allocating: it runs for every request on a gateway.
pub fn covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern.rsplit_once('/').map_or(pattern, |(_, h)| h);
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => {
            suffix.starts_with('.')
                && host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// How specifically the Gateway host `pattern` covers `host`, `None` when it does not:
/// an exact name beats any wildcard, a longer wildcard suffix beats a shorter one, and
/// `*` comes last.
fn specificity(pattern: &str, host: &str) -> Option<usize> {
    if !covers(pattern, host) {
        return None;
    }
    let bare = pattern.rsplit_once('/').map_or(pattern, |(_, h)| h);
    Some(match bare.strip_prefix('*') {
        Some("") => 0,
        Some(suffix) => suffix.len(),
        None => usize::MAX,
    })
}

/// The index of the server (given by its host patterns) that owns `host`: the one
/// whose patterns cover it most specifically; on a tie, the first.
pub fn most_specific<'a>(
    servers: impl IntoIterator<Item = &'a [String]>,
    host: &str,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, hosts) in servers.into_iter().enumerate() {
        let rank = hosts.iter().filter_map(|h| specificity(h, host)).max();
        if let Some(rank) = rank
            && best.is_none_or(|(r, _)| rank > r)
        {
            best = Some((rank, index));
        }
    }
    best.map(|(_, index)| index)
}

/// The HTTPS server a connection's SNI selected, put in the extensions of every request
/// on that connection so that routing never leaves it.
#[derive(Clone, Debug)]
pub struct ChosenServer {
    /// The host patterns of the port's servers, as they were when the connection was
    /// accepted.
    pub hosts: Arc<Vec<Vec<String>>>,
    /// The selected server.
    pub index: usize,
}

/// The error for a request whose host the connection's server does not serve: 421 when
/// another server of the port serves it (the client should open a connection with that
/// SNI), 404 `NR` when none does.
fn off_server(chosen: &ChosenServer, host: &str) -> Option<BoxError> {
    match most_specific(chosen.hosts.iter().map(Vec::as_slice), host) {
        Some(index) if index == chosen.index => None,
        Some(_) => Some(Box::new(respond::Misdirected)),
        None => Some(Box::new(NoRoute)),
    }
}

/// `svc` for the requests of one TLS connection whose SNI selected `chosen`.
pub fn on_server(svc: HttpService, chosen: ChosenServer) -> HttpService {
    tower::util::BoxCloneSyncService::new(tower::ServiceExt::map_request(
        svc,
        move |mut req: Request<BoxBody>| {
            req.extensions_mut().insert(chosen.clone());
            req
        },
    ))
}

/// Routes gateway requests: the chosen server's hosts, https redirects, then the
/// gateway's route table.
#[derive(Clone)]
pub struct GatewayRoutes {
    router: Router<RouteService>,
    redirect_hosts: Arc<ArcSwap<Vec<String>>>,
}

impl GatewayRoutes {
    /// Routes with `router`; hosts `redirect_hosts` covers are redirected to HTTPS.
    pub fn new(router: &MeshRouter, redirect_hosts: Arc<ArcSwap<Vec<String>>>) -> Self {
        Self {
            router: router.router(),
            redirect_hosts,
        }
    }
}

impl Service<Request<BoxBody>> for GatewayRoutes {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> RouteFuture {
        if let Err(e) = prepare(&mut req) {
            return RouteFuture::local(Err(Box::new(e)));
        }
        let host = request_host(&req).unwrap_or_default();
        if let Some(e) = req
            .extensions()
            .get::<ChosenServer>()
            .and_then(|chosen| off_server(chosen, &host))
        {
            return RouteFuture::local(Err(e));
        }
        if self.redirect_hosts.load().iter().any(|p| covers(p, &host)) {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            return RouteFuture::local(Ok(respond::https_redirect(&host, pq)));
        }
        drop(host);
        RouteFuture::Routed(self.router.call(req))
    }
}

/// The gateway stack over `router` (see the module docs).
pub fn service(
    router: &MeshRouter,
    telemetry: &Telemetry,
    redirect_hosts: Arc<ArcSwap<Vec<String>>>,
    authn: mesh_tls::authn::AuthnHandle,
    authz: mesh_tls::authz::PolicyHandle,
    normalization: mesh_tls::authz::PathNormalization,
    edge: EdgeHeaders,
) -> HttpService {
    let authorize = mesh_tls::authz::AuthzLayer::from_handle(authz)
        .normalization(mesh_tls::authz::NormalizeOptions::new(normalization))
        // The gateway has appended its peer to X-Forwarded-For: the client is that
        // entry, or the one `numTrustedProxies` further left.
        .trusted_proxies(edge.num_trusted_proxies + 1);
    tower::util::BoxCloneSyncService::new(
        Sanitize::new(
            ServiceBuilder::new()
                .map_response(boxed_response)
                .layer(
                    // Labelled by the service each request was routed to (Istio's
                    // `destination_service` at a gateway), else by its authority. Every
                    // route leads to a mesh endpoint over mTLS: requests carry the gateway's
                    // metadata; the mesh's answer never reaches the client.
                    TelemetryLayer::outbound_by_route(telemetry, AUTHORITY_LIMIT)
                        .with_metadata_exchange(true),
                )
                .map_request(boxed_request)
                .service(Respond::new(
                    ServiceBuilder::new()
                        .map_response(authn_response)
                        .layer(mesh_tls::authn::AuthnLayer::from_handle(authn))
                        .map_response(authz_response)
                        .layer(authorize)
                        .service(GatewayRoutes::new(router, redirect_hosts)),
                )),
            true,
        )
        .edge(edge),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_cover_like_istio() {
        assert!(covers("api.example.com", "API.example.com"));
        assert!(covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("*", "anything"));
        assert!(covers("prod/api.example.com", "api.example.com"));
        assert!(!covers("api.example.com", "evil.com"));
        assert!(covers("*.Example.COM", "a.example.com"));
        assert!(!covers("*.example.com", "a.example.co"));
    }

    fn hosts(servers: &[&[&str]]) -> Arc<Vec<Vec<String>>> {
        Arc::new(
            servers
                .iter()
                .map(|h| h.iter().map(|s| (*s).to_owned()).collect())
                .collect(),
        )
    }

    #[test]
    fn the_most_specific_server_owns_a_host() {
        let s = hosts(&[&["*"], &["*.example.com"], &["mutual.example.com"]]);
        let owner = |host| most_specific(s.iter().map(Vec::as_slice), host);
        assert_eq!(owner("mutual.example.com"), Some(2));
        assert_eq!(owner("MUTUAL.example.com"), Some(2));
        assert_eq!(owner("simple.example.com"), Some(1));
        assert_eq!(owner("example.org"), Some(0));
        let chosen = ChosenServer {
            hosts: s.clone(),
            index: 0,
        };
        // A `*` server's connection does not carry a host another server owns.
        assert!(off_server(&chosen, "mutual.example.com").is_some());
        assert!(off_server(&chosen, "example.org").is_none());
        let chosen = ChosenServer {
            hosts: hosts(&[&["simple.example.com"], &["mutual.example.com"]]),
            index: 0,
        };
        let e = off_server(&chosen, "mutual.example.com").unwrap();
        assert!(mesh_core::error::is_caused_by::<respond::Misdirected>(
            e.as_ref()
        ));
        let e = off_server(&chosen, "other.example.com").unwrap();
        assert!(mesh_core::error::is_caused_by::<NoRoute>(e.as_ref()));
        assert!(off_server(&chosen, "simple.example.com").is_none());
    }
}
