//! The sidecar: the outbound and inbound stacks of a [`Mesh`](crate::Mesh) on their
//! listeners, plus the admin server, configuration reload and graceful drain.

use std::sync::Arc;

use super::runtime::{Process, StartError};
use super::shutdown::ProxyHandle;
use crate::serve;
use crate::settings::{AppProtocol, Listeners, Settings};
use crate::stack::HttpClient;

/// The sidecar proxy.
#[derive(Debug)]
pub struct Sidecar;

impl Sidecar {
    /// Starts the sidecar described by `settings` on the current tokio runtime: loads
    /// the configuration (a bad one fails the start with every error), obtains the
    /// certificate, binds the listeners and starts watching for changes.
    pub async fn start(settings: Settings) -> Result<ProxyHandle, StartError> {
        let settings = Arc::new(settings);
        let mut process = Process::new(settings.clone(), None).await?;
        let mesh = process.mesh.clone();
        let active = |name| mesh.telemetry().metrics().proxy().active_connections(name);

        // Outbound: plain HTTP from the application.
        let outbound = process
            .bind("outbound", settings.listeners.outbound)
            .await?;
        let svc = match outbound.local_addr() {
            Ok(address) => mesh.outbound().on_listener(address).boxed(),
            Err(_) => mesh.outbound().boxed(),
        };
        process.serve(serve::run(
            outbound,
            mesh.serve_options(active("outbound")),
            move |tcp, remote| {
                let svc = svc.clone();
                async move {
                    let local = tcp.local_addr().ok()?;
                    let ctx = mesh_tls::ConnectionContext::plaintext(remote, local);
                    Some((tcp, crate::stack::inbound::per_connection(svc, ctx)))
                }
            },
        ));

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
            let options = mesh.serve_options(active("tcp"));
            process.serve(serve::run(listener, options, move |tcp, remote| {
                egress.clone().accept(tcp, remote)
            }));
        }

        // Inbound: mTLS per PeerAuthentication, to the application (HTTP, or TCP for
        // connections that negotiated it).
        let inbound = process.bind("inbound", settings.listeners.inbound).await?;
        let app = HttpClient::application(
            settings.listeners.app,
            settings.listeners.app_protocol == AppProtocol::Http2,
        );
        process.serve(mesh.run_inbound(
            inbound,
            mesh.inbound(app),
            settings.listeners.app.port(),
            Some(mesh.tcp_inbound(settings.listeners.app)),
        ));
        process.finish().await
    }
}
