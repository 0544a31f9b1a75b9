//! The sidecar: the outbound and inbound stacks of a [`Mesh`] on their
//! listeners, plus the admin server, configuration reload and graceful drain.
//!
//! # Transparent capture
//!
//! With `listeners.capture` (the rules of `mesh-proxy init` installed, see
//! [`crate::capture`]) each connection's original destination decides (ISTIO.md TC-10,
//! TC-11, PS-30, PS-31):
//!
//! ```text
//! outbound, original destination IP:port
//!   -> owned by a service (ServiceEntry `addresses`, Kubernetes ClusterIPs): the port's
//!      protocol, declared or detected from the first bytes ([`crate::sniff`]), decides
//!      as on a `listeners.tcp` listener: TCP takes that service's TCP routes, TLS its
//!      `tls` routes by SNI, HTTP goes on below
//!   -> owned by a service on another port, or a port some service serves over HTTP (or
//!      with no declared protocol), or HTTP from above: HTTP, routed by Host; a Host the routes do not know
//!      goes to the service that owns the address, else passes through to the original
//!      destination (ALLOW_ANY) or gets 502 (REGISTRY_ONLY)
//!   -> anything else: TCP passthrough to the original destination (ALLOW_ANY), or the
//!      connection is closed (REGISTRY_ONLY, Istio's BlackHoleCluster)
//! inbound, original destination port P
//!   -> PeerAuthentication of P, AuthorizationPolicy sees P (`ports`, `destination.port`)
//!   -> the application at `listeners.app`'s address and port P (loopback, as Istio's
//!      inbound clusters before 1.10); HTTP, or TCP for connections that negotiated it
//! ```
//!
//! A connection that was not redirected (its original destination is the listener
//! itself) is served as without capture, so an application that calls the outbound
//! listener with a Host keeps working. The sidecar's own connections run as the proxy
//! UID and are never redirected, which is what keeps them from looping; besides, an
//! inbound connection whose original port is one of the proxy's own listener ports is
//! closed, and the outbound listener keeps its 508 answer for requests addressed to
//! itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::runtime::{Process, StartError};
use super::shutdown::ProxyHandle;
use crate::capture::{self, Addresses};
use crate::mesh::Mesh;
use crate::serve;
use crate::settings::{AppProtocol, Listeners, Settings};
use crate::sniff::{self, Detected};
use crate::stack::client::StreamLimits;
use crate::stack::outbound::OriginalDestination;
use crate::stack::{HttpClient, HttpService, OutboundMode, inbound, tcp};

/// The sidecar proxy.
#[derive(Debug)]
pub struct Sidecar;

/// The IPv6 address a capturing listener also binds for `addr`: `[::1]` for
/// `127.0.0.1`, `[::]` for `0.0.0.0`, same port.
fn ipv6_counterpart(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            Some(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()))
        }
        IpAddr::V4(ip) if ip.is_unspecified() => {
            Some(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port()))
        }
        _ => None,
    }
}

/// The addresses of the services in force, kept current across configuration updates.
fn watched_addresses(mesh: &Mesh) -> Arc<ArcSwap<Addresses>> {
    let naming = || mesh.router().snapshot().table().naming().clone();
    let addresses = Arc::new(ArcSwap::from_pointee(Addresses::from_config(
        &mesh.active().load().config,
        &naming(),
    )));
    let updated = addresses.clone();
    let router = mesh.router().clone();
    mesh.on_update(move |config| {
        let naming = router.snapshot().table().naming().clone();
        updated.store(Arc::new(Addresses::from_config(config, &naming)));
    });
    addresses
}

impl Sidecar {
    /// Starts the sidecar described by `settings` on the current tokio runtime: loads
    /// the configuration (a bad one fails the start with every error), obtains the
    /// certificate, binds the listeners and starts watching for changes.
    pub async fn start(settings: Settings) -> Result<ProxyHandle, StartError> {
        let settings = Arc::new(settings);
        let mut process = Process::new(settings.clone(), None).await?;
        let mesh = process.mesh.clone();
        let capture = settings.listeners.capture;

        // Outbound: plain HTTP from the application, or whatever capture redirects.
        let mut outbound = vec![
            process
                .bind("outbound", settings.listeners.outbound)
                .await?,
        ];
        if capture
            && let Some(v6) = ipv6_counterpart(settings.listeners.outbound)
            && let Some(listener) = process.bind_ipv6_only("outbound", v6)
        {
            outbound.push(listener);
        }
        let addresses = capture.then(|| watched_addresses(&mesh));
        for listener in outbound {
            process.serve(serve_outbound(
                &mesh,
                &settings,
                listener,
                addresses.clone(),
            ));
        }

        // TCP egress: one listener per service port the application connects to.
        for (bind, destination) in &settings.listeners.tcp {
            let Some((host, port)) = Listeners::tcp_destination(destination) else {
                continue;
            };
            let listener = process.bind(&format!("tcp {destination}"), *bind).await?;
            // HTTP, TLS by SNI or opaque TCP, as the port declares or the first bytes say.
            let detection = settings.listeners.protocol_detection_timeout;
            let egress = crate::sniff::Egress::new(&mesh, host, port, listener.local_addr().ok())
                .detection_timeout(detection.map(Into::into));
            let options = mesh.serve_options("tcp");
            process.serve(serve::run(listener, options, move |tcp, remote| {
                egress.clone().accept(tcp, remote)
            }));
        }

        // Inbound: mTLS per PeerAuthentication, to the application (HTTP, or TCP for
        // connections that negotiated it).
        let inbound = process.bind("inbound", settings.listeners.inbound).await?;
        if capture {
            let mut listeners = vec![inbound];
            if let Some(v6) = ipv6_counterpart(settings.listeners.inbound)
                && let Some(listener) = process.bind_ipv6_only("inbound", v6)
            {
                listeners.push(listener);
            }
            for listener in listeners {
                process.serve(serve_captured_inbound(&mesh, &settings, listener));
            }
        } else {
            let app = HttpClient::application(
                settings.listeners.app,
                settings.listeners.app_protocol == AppProtocol::Http2,
            )
            .stream_limits(StreamLimits::of(&settings.limits));
            process.serve(mesh.run_inbound(
                inbound,
                mesh.inbound(app),
                settings.listeners.app.port(),
                Some(mesh.tcp_inbound(settings.listeners.app)),
            ));
        }
        process.finish().await
    }
}

/// The outbound listener's serve loop; with `addresses` (capture), redirected
/// connections go by their original destination (see the module docs).
fn serve_outbound(
    mesh: &Mesh,
    settings: &Settings,
    listener: TcpListener,
    addresses: Option<Arc<ArcSwap<Addresses>>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let svc: HttpService = match listener.local_addr() {
        Ok(address) => mesh.outbound().on_listener(address).boxed(),
        Err(_) => mesh.outbound().boxed(),
    };
    let connect_timeout = settings.limits.connect_timeout.as_std();
    let detection: Option<std::time::Duration> = settings
        .listeners
        .protocol_detection_timeout
        .map(Into::into)
        .filter(|t: &std::time::Duration| !t.is_zero());
    let mesh = mesh.clone();
    let options = mesh.serve_options("outbound");
    serve::run(listener, options, move |tcp, remote| {
        let svc = svc.clone();
        let addresses = addresses.clone();
        let mesh = mesh.clone();
        async move {
            let local = tcp.local_addr().ok()?;
            let original = addresses
                .as_ref()
                .and_then(|_| capture::original_destination(&tcp));
            let (Some(original), Some(addresses)) = (original, addresses) else {
                let ctx = mesh_tls::ConnectionContext::plaintext(remote, local);
                return Some((tcp, inbound::per_connection(svc, ctx)));
            };
            let addresses = addresses.load();
            let owner = addresses.owner(original);
            if let Some(owner) = &owner {
                // The port's declared protocol, else the first bytes (PS-01, PS-10).
                let detected = match sniff::declared(Some(owner.protocol), original.port()) {
                    Some(declared) => declared,
                    None => sniff::detect(&tcp, detection).await,
                };
                match detected {
                    Detected::Http => {}
                    Detected::Tls => {
                        let outbound = mesh.tcp_outbound(&owner.host, original.port());
                        tokio::spawn(sniff::proxy_by_sni(outbound, tcp));
                        return None;
                    }
                    Detected::Opaque => {
                        let outbound = mesh.tcp_outbound(&owner.host, original.port());
                        tokio::spawn(async move { outbound.proxy(tcp).await });
                        return None;
                    }
                }
            }
            if owner.is_none() && !addresses.is_http_port(original.port()) {
                match mesh.outbound_mode() {
                    OutboundMode::AllowAny => {
                        let telemetry = mesh.telemetry().clone();
                        tokio::spawn(async move {
                            tcp::passthrough(tcp, original, &telemetry, connect_timeout).await;
                        });
                    }
                    OutboundMode::RegistryOnly => {
                        tracing::debug!(%original, "REGISTRY_ONLY: no service owns the address");
                    }
                }
                return None;
            }
            let destination = OriginalDestination {
                address: original,
                service: owner
                    .map(|o| o.host)
                    .or_else(|| addresses.host_of(original.ip())),
            };
            let svc: HttpService = tower::util::BoxCloneSyncService::new(svc.map_request(
                move |mut req: http::Request<mesh_core::body::BoxBody>| {
                    req.extensions_mut().insert(destination.clone());
                    req
                },
            ));
            let ctx = mesh_tls::ConnectionContext::plaintext(remote, original);
            Some((tcp, inbound::per_connection(svc, ctx)))
        }
    })
}

/// The inbound listener's serve loop under capture (see the module docs).
fn serve_captured_inbound(
    mesh: &Mesh,
    settings: &Settings,
    listener: TcpListener,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let acceptor = mesh_tls::InboundAcceptor::new(mesh.certificates().clone())
        .with_handshake_timeout(settings.limits.header_read_timeout.as_std());
    let modes = mesh.peer_authentication();
    let app = settings.listeners.app;
    let h2 = settings.listeners.app_protocol == AppProtocol::Http2;
    let l = &settings.listeners;
    let mut own_ports = vec![l.outbound.port(), l.inbound.port(), l.admin.port()];
    own_ports.extend(capture::PROXY_PORTS);
    let own_ports: Arc<[u16]> = own_ports.into();
    // One inbound stack per application port, made on its first connection.
    let stacks: Arc<Mutex<HashMap<u16, HttpService>>> = Arc::default();
    let limits = StreamLimits::of(&settings.limits);
    let mesh = mesh.clone();
    serve::run(
        listener,
        mesh.serve_options("inbound"),
        move |tcp_stream, remote| {
            let acceptor = acceptor.clone();
            let modes = modes.clone();
            let own_ports = own_ports.clone();
            let stacks = stacks.clone();
            let mesh = mesh.clone();
            async move {
                let original = capture::original_destination(&tcp_stream);
                let (port, target) = match original {
                    Some(o) if own_ports.contains(&o.port()) => {
                        tracing::debug!(%remote, original = %o, "inbound connection to a proxy port closed");
                        return None;
                    }
                    Some(o) => (o.port(), SocketAddr::new(app.ip(), o.port())),
                    None => (app.port(), app),
                };
                let (io, mut ctx) = inbound::accept(acceptor, modes, port, tcp_stream).await?;
                // AuthorizationPolicy `ports` and `destination.*` see the original
                // destination (the application's port), not the sidecar's listener.
                match original {
                    Some(o) => ctx.info.local = o,
                    None => ctx.info.local.set_port(port),
                }
                if tcp::is_tcp(&ctx) {
                    let tcp_app = mesh.tcp_inbound(target);
                    tokio::spawn(async move { tcp_app.proxy(io, ctx).await });
                    return None;
                }
                let svc = stacks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(port)
                    .or_insert_with(|| {
                        mesh.inbound(HttpClient::application(target, h2).stream_limits(limits))
                    })
                    .clone();
                Some((io, inbound::per_connection(svc, ctx)))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capturing_listeners_add_their_ipv6_counterpart() {
        let v6 = |s: &str| ipv6_counterpart(s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(v6("127.0.0.1:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(v6("0.0.0.0:15006").as_deref(), Some("[::]:15006"));
        assert_eq!(v6("10.0.0.1:15006"), None);
        assert_eq!(v6("[::]:15006"), None);
    }
}
