//! The sidecar: outbound, inbound and admin listeners, configuration reload.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::Request;
use hyper::body::Incoming;
use mesh_routing::{Listener, RouterHandle};
use mesh_tls::authz::{PathNormalization, PolicyHandle};
use mesh_tls::{ClientTls, InboundAcceptor};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::admin::Admin;
use crate::inbound::{self, HttpService};
use crate::outbound::{Destinations, MakeDest, Outbound, OutboundListener};
use crate::reload::{self, Active, Reloadable};
use crate::runtime::{self, StartError};
use crate::serve::{self, Sanitize};
use crate::settings::Settings;
use crate::shutdown::ProxyHandle;

/// The sidecar proxy.
#[derive(Debug)]
pub struct Sidecar;

impl Sidecar {
    /// Starts the sidecar described by `settings` on the current tokio runtime: loads
    /// the configuration (a bad one fails the start with every error), obtains the
    /// certificate, binds the listeners and starts watching for changes.
    pub async fn start(settings: Settings) -> Result<ProxyHandle, StartError> {
        let settings = Arc::new(settings);
        let compiled = reload::compile(&settings, &Listener::Mesh).map_err(StartError::Config)?;
        let common = runtime::common(settings.clone()).await?;
        let limits = &settings.limits;
        let token = CancellationToken::new();
        let admin_token = CancellationToken::new();
        let destinations = Destinations::default();
        let make = MakeDest {
            tls: ClientTls::new(common.store.clone()),
            connect_timeout: limits.connect_timeout.as_std(),
            replay_limit: limits.max_retry_body_bytes,
            idle_timeout: limits.idle_timeout.as_std(),
            destinations: destinations.clone(),
        };
        let router = match settings.random_seed {
            Some(seed) => RouterHandle::with_seed(make, compiled.routing, seed),
            None => RouterHandle::new(make, compiled.routing),
        };
        let authz = PolicyHandle::new(compiled.policies);
        let peer_auth = Arc::new(ArcSwap::from_pointee(compiled.peer_auth));
        let active = Arc::new(ArcSwap::from_pointee(Active {
            version: compiled.config.version(),
            loaded_at: SystemTime::now(),
            config: compiled.config,
        }));
        let reloadable = Reloadable {
            settings: settings.clone(),
            listener: Listener::Mesh,
            router: router.clone(),
            authz: authz.clone(),
            peer_auth: peer_auth.clone(),
            active: active.clone(),
            metrics: common.telemetry.metrics().proxy().clone(),
            on_swap: Arc::default(),
        };
        let mut keep = common.keep;
        let mut background = Vec::new();
        let (watch_task, watcher) =
            reload::spawn_watch(reloadable, reload::config_dir(&settings), token.clone())
                .map_err(|e| StartError::Other(format!("watching configDir: {e}")))?;
        background.push(watch_task);
        keep.push(watcher);

        let builder = Arc::new(serve::builder(limits));
        let drain = limits.drain_timeout.as_std();
        let mut listeners = JoinSet::new();
        let mut addresses = Vec::new();

        // Outbound: plain HTTP from the application.
        let outbound_listener = runtime::bind(settings.listeners.outbound).await?;
        addresses.push(("outbound".to_owned(), local(&outbound_listener)?));
        let outbound: HttpService = tower::util::BoxCloneSyncService::new(Sanitize::new(
            OutboundListener::new(
                &common.telemetry,
                Outbound::new(
                    router,
                    settings.outbound_traffic_policy.mode,
                    limits.connect_timeout.as_std(),
                ),
            ),
            false,
        ));
        listeners.spawn(serve::run(
            outbound_listener,
            serve::Options {
                idle_timeout: limits.idle_timeout.as_std(),
                builder: builder.clone(),
                shutdown: token.clone(),
                drain,
                max_connections: limits.max_connections,
                active: common
                    .telemetry
                    .metrics()
                    .proxy()
                    .active_connections("outbound"),
            },
            move |tcp, remote| {
                let svc = outbound.clone();
                async move {
                    let local = tcp.local_addr().ok()?;
                    let ctx = mesh_tls::ConnectionContext::plaintext(remote, local);
                    Some((tcp, inbound::per_connection(svc, ctx)))
                }
            },
        ));

        // Inbound: mTLS per PeerAuthentication, to the application.
        let inbound_listener = runtime::bind(settings.listeners.inbound).await?;
        addresses.push(("inbound".to_owned(), local(&inbound_listener)?));
        let normalization =
            PathNormalization::from_istio(&settings.path_normalization).unwrap_or_default();
        let inbound_svc = inbound::service(
            &common.telemetry,
            &settings.service_host(),
            authz,
            normalization,
            settings.listeners.app,
            settings.listeners.app_protocol == crate::settings::AppProtocol::Http2,
        );
        let acceptor = InboundAcceptor::new(common.store.clone())
            .with_handshake_timeout(limits.header_read_timeout.as_std());
        let app_port = settings.listeners.app.port();
        listeners.spawn(serve::run(
            inbound_listener,
            serve::Options {
                idle_timeout: limits.idle_timeout.as_std(),
                builder: builder.clone(),
                shutdown: token.clone(),
                drain,
                max_connections: limits.max_connections,
                active: common
                    .telemetry
                    .metrics()
                    .proxy()
                    .active_connections("inbound"),
            },
            move |tcp, _remote| {
                let svc = inbound_svc.clone();
                let acceptor = acceptor.clone();
                let modes = peer_auth.clone();
                async move {
                    let (io, ctx) = inbound::accept(acceptor, modes, app_port, tcp).await?;
                    Some((io, inbound::per_connection(svc, ctx)))
                }
            },
        ));

        // Admin.
        let admin_listener = runtime::bind(settings.listeners.admin).await?;
        addresses.push(("admin".to_owned(), local(&admin_listener)?));
        let admin = Admin {
            telemetry: common.telemetry.clone(),
            store: common.store.clone(),
            active,
            destinations,
            draining: token.clone(),
        };
        background.push(spawn_admin(
            admin_listener,
            admin,
            builder,
            admin_token.clone(),
        ));
        // The admin server stays up while the listeners drain, then stops.
        let stop_admin = token.clone();
        background.push(tokio::spawn(async move {
            stop_admin.cancelled().await;
            tokio::time::sleep(drain).await;
            admin_token.cancel();
        }));

        tracing::info!(
            identity = %common.store.identity(),
            ?addresses,
            "sidecar started"
        );
        Ok(ProxyHandle {
            token,
            listeners,
            background,
            flush: common.flush,
            keep,
            addresses,
        })
    }
}

/// The bound address of a listener.
pub(crate) fn local(l: &tokio::net::TcpListener) -> Result<std::net::SocketAddr, StartError> {
    l.local_addr()
        .map_err(|e| StartError::Other(format!("listener address: {e}")))
}

/// Serves the admin API on `listener` until `stop`.
pub(crate) fn spawn_admin(
    listener: tokio::net::TcpListener,
    admin: Admin,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let admin = admin.clone();
        async move { admin.handle(req).await }
    });
    tokio::spawn(serve::run(
        listener,
        serve::Options {
            builder,
            shutdown: stop,
            drain: std::time::Duration::from_millis(100),
            max_connections: 64,
            active: Default::default(),
            // Envoy's default downstream idle timeout.
            idle_timeout: std::time::Duration::from_secs(3600),
        },
        move |tcp, _| {
            let svc = svc.clone();
            async move { Some((tcp, svc.map_err(|e| -> mesh_core::BoxError { match e {} }))) }
        },
    ))
}
