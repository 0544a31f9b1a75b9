//! The service registry: which hosts exist, their ports, and their endpoints.
//!
//! A sidecar outside Kubernetes learns services from `ServiceEntry` resources:
//! `resolution: STATIC` lists IP endpoints inline (address, per-port-name ports, labels,
//! `serviceAccount` turned into the SPIFFE identity the endpoint must present);
//! `resolution: DNS` names hosts that are resolved with the system resolver, again and
//! again (see [`crate::RouterHandle::spawn_dns_refresh`]). Services can also be added in
//! code.
//!
//! # Errors
//!
//! Lookups do not fail: an unknown host is `None`, a host without matching endpoints an
//! empty list; the router turns those into `NC` and `UH`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::{Endpoint, Identity, Labels, Locality, TlsMode};

/// How a service's endpoints are found (`ServiceEntry.resolution`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resolution {
    /// Endpoint addresses are IPs.
    #[default]
    Static,
    /// Endpoint addresses (or, without endpoints, the hosts) are DNS names resolved
    /// again when their TTL runs out; every address is an endpoint.
    Dns,
    /// As [`Dns`](Self::Dns), but only the first address of each name is used (Envoy's
    /// logical DNS).
    DnsRoundRobin,
    /// No endpoints: traffic goes to the address the client dialled (not supported by the router).
    None,
}

/// A port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The service port number.
    pub number: u16,
    /// The port name; endpoints map names to their own port numbers.
    pub name: String,
    /// `targetPort`: the endpoint port when an endpoint does not name one.
    pub target_port: Option<u16>,
    /// The declared protocol (`TCP`, `HTTP`, …); empty: taken from the name.
    pub protocol: String,
}

impl ServicePort {
    /// A port whose endpoints listen on the same number.
    pub fn new(number: u16, name: impl Into<String>) -> Self {
        Self {
            number,
            name: name.into(),
            target_port: None,
            protocol: String::new(),
        }
    }

    /// Declares the port's protocol.
    #[must_use]
    pub fn with_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = protocol.into();
        self
    }

    /// How a sidecar treats this port (ISTIO.md PS-01, PS-02, PS-05, PS-06): from the
    /// protocol, else the name (`grpc-web…`, else its part before the first `-`),
    /// case-insensitively.
    pub fn protocol(&self) -> PortProtocol {
        let declared = if self.protocol.is_empty() {
            self.name.as_str()
        } else {
            self.protocol.as_str()
        };
        if declared
            .get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("grpc-web"))
        {
            return PortProtocol::Http2;
        }
        // Kubernetes' standard application protocols (PS-03).
        match declared {
            "kubernetes.io/h2c" => return PortProtocol::Http2,
            "kubernetes.io/ws" => return PortProtocol::Http,
            "kubernetes.io/wss" => return PortProtocol::Tls,
            _ => {}
        }
        let class = declared.split('-').next().unwrap_or("");
        let is = |names: &[&str]| names.iter().any(|n| class.eq_ignore_ascii_case(n));
        if is(&["http2", "grpc"]) {
            PortProtocol::Http2
        } else if is(&["http", "http_proxy"]) {
            PortProtocol::Http
        } else if is(&["tls", "https"]) {
            PortProtocol::Tls
        } else if is(&["tcp", "mongo", "redis", "mysql"]) {
            PortProtocol::Tcp
        } else {
            PortProtocol::Auto
        }
    }

    /// Whether a sidecar proxies this port's connections as TCP, opaque or routed by SNI
    /// ([`PortProtocol::Tcp`], [`PortProtocol::Tls`]).
    pub fn is_tcp(&self) -> bool {
        matches!(self.protocol(), PortProtocol::Tcp | PortProtocol::Tls)
    }
}

/// The class of a service port's protocol, as a sidecar treats it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PortProtocol {
    /// `http`, `http_proxy`: HTTP, HTTP/1.1 upstream unless upgraded (PS-07, PS-20).
    Http,
    /// `http2`, `grpc`, `grpc-web`: HTTP with HTTP/2 upstream always (PS-07).
    Http2,
    /// `tcp`, `mongo`, `redis`, `mysql`: opaque TCP (PS-05, PS-06).
    Tcp,
    /// `tls`, `https`: TCP carrying the application's own TLS, which a sidecar routes by
    /// the ClientHello's SNI without terminating it (PS-06, PS-30).
    Tls,
    /// Anything else, or nothing: detected; HTTP upstream in the client's protocol
    /// (PS-20 rule 4).
    #[default]
    Auto,
}

/// One instance of a service as configured (`ServiceEntry.endpoints[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// An IP address, or a DNS name for `resolution: DNS`.
    pub address: String,
    /// Port name → port number on this instance.
    pub ports: BTreeMap<String, u16>,
    /// The instance's labels.
    pub labels: Labels,
    /// The identities the instance presents (from `serviceAccount`).
    pub identities: Vec<Identity>,
    /// The instance's ports whose server takes plaintext only (its PeerAuthentication
    /// mode is `DISABLE`): auto-mTLS sends plaintext there (SR-24); see
    /// [`Registry::mark_plaintext_servers`].
    pub plaintext_ports: Vec<u16>,
    /// Where the instance runs (`locality`, `region/zone/subzone`).
    pub locality: Locality,
    /// The instance's network (`network`); `None`: the proxy's own.
    pub network: Option<String>,
    /// Load-balancing weight (`weight`; unset or 0 is 1).
    pub weight: u32,
}

impl WorkloadEntry {
    /// An instance at `address` without labels.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ports: BTreeMap::new(),
            labels: Labels::new(),
            identities: Vec::new(),
            plaintext_ports: Vec::new(),
            locality: Locality::default(),
            network: None,
            weight: 1,
        }
    }

    /// Sets the locality (`region/zone/subzone`).
    #[must_use]
    pub fn with_locality(mut self, locality: &str) -> Self {
        self.locality = Locality::parse(locality);
        self
    }

    /// Sets the network.
    #[must_use]
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Sets the load-balancing weight (0 counts as 1).
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Sets the labels.
    #[must_use]
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.labels = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Maps port `name` to `number` on this instance.
    #[must_use]
    pub fn with_port(mut self, name: impl Into<String>, number: u16) -> Self {
        self.ports.insert(name.into(), number);
        self
    }

    /// Sets the identity the instance presents.
    #[must_use]
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identities = vec![identity];
        self
    }

    fn port_for(&self, port: &ServicePort) -> u16 {
        self.ports
            .get(&port.name)
            .copied()
            .or(port.target_port)
            .unwrap_or(port.number)
    }

    /// The endpoint at `ip` on `port`; `external`: the service is `MESH_EXTERNAL`.
    fn endpoint(&self, ip: IpAddr, port: &ServicePort, external: bool) -> Endpoint {
        let number = self.port_for(port);
        let mut ep = Endpoint::new(SocketAddr::new(ip, number))
            .with_labels(self.labels.clone())
            .with_locality(self.locality.clone())
            .with_weight(self.weight);
        ep.network = self.network.as_deref().map(Arc::from);
        ep.identities = Arc::from(self.identities.clone());
        // Auto-mTLS never applies to a mesh-external service nor to a server whose
        // PeerAuthentication disables mTLS (SR-24).
        ep.tls_mode = if external || self.plaintext_ports.contains(&number) {
            TlsMode::Disabled
        } else {
            self.tls_mode()
        };
        ep
    }

    /// Whether the instance takes Istio mTLS under auto-mTLS, by Istio's rule for
    /// ServiceEntry and WorkloadEntry endpoints (SR-25): the `security.istio.io/tlsMode`
    /// label when written, else Istio mTLS exactly when the entry names a
    /// `serviceAccount`. (An endpoint also needs its service inside the mesh and its
    /// server accepting mTLS on the port, SR-24: see [`Registry::mark_plaintext_servers`].)
    pub fn tls_mode(&self) -> TlsMode {
        let fallback = if self.identities.is_empty() {
            TlsMode::Disabled
        } else {
            TlsMode::Istio
        };
        TlsMode::from_labels(&self.labels, fallback)
    }
}

/// A service: its hosts, ports and instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Fully qualified host names.
    pub hosts: Vec<String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Instances.
    pub endpoints: Vec<WorkloadEntry>,
    /// How instances are found.
    pub resolution: Resolution,
    /// The namespace of the resource that declared the service (a ServiceEntry's).
    pub namespace: String,
    /// `location: MESH_EXTERNAL`: outside the mesh, so never sent Istio mTLS by auto-mTLS.
    pub mesh_external: bool,
}

impl Service {
    /// The port numbered `number`, if the service has it.
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The statically known endpoints on `port` whose labels contain `selector`.
    ///
    /// DNS-named instances are left out: they appear once resolved.
    pub fn static_endpoints(&self, port: &ServicePort, selector: &Labels) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .filter_map(|w| {
                let ip: IpAddr = w.address.parse().ok()?;
                Some(w.endpoint(ip, port, self.mesh_external))
            })
            .collect()
    }

    /// Resolves every instance on `port` whose labels contain `selector`: addresses as
    /// they are, DNS names with `dns` (every address of a name for `DNS`, the first for
    /// `DNS_ROUND_ROBIN`, as Envoy's strict and logical DNS clusters use them). Instances
    /// that fail to resolve are skipped. Also returns the shortest TTL of the answers,
    /// `None` when no name was looked up.
    pub async fn resolve_endpoints(
        &self,
        port: &ServicePort,
        selector: &Labels,
        dns: &crate::dns::DnsResolver,
    ) -> (Vec<Endpoint>, Option<std::time::Duration>) {
        let mut out = Vec::new();
        let mut ttl: Option<std::time::Duration> = None;
        let selected: Vec<&WorkloadEntry> = self
            .endpoints
            .iter()
            .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect();
        // A DNS service without instances resolves its own hosts.
        let fallback: Vec<WorkloadEntry> = if self.endpoints.is_empty() && selector.is_empty() {
            self.hosts
                .iter()
                .filter(|h| !h.starts_with('*'))
                .map(WorkloadEntry::new)
                .collect()
        } else {
            Vec::new()
        };
        for w in selected.into_iter().chain(fallback.iter()) {
            if let Ok(ip) = w.address.parse::<IpAddr>() {
                out.push(w.endpoint(ip, port, self.mesh_external));
                continue;
            }
            match dns.lookup(&w.address).await {
                Ok((ips, valid)) => {
                    ttl = Some(ttl.map_or(valid, |t| t.min(valid)));
                    let take = if self.resolution == Resolution::DnsRoundRobin {
                        1
                    } else {
                        usize::MAX
                    };
                    for ip in ips.into_iter().take(take) {
                        let ep = w.endpoint(ip, port, self.mesh_external);
                        if !out.contains(&ep) {
                            out.push(ep);
                        }
                    }
                }
                Err(err) => {
                    tracing::debug!(address = %w.address, %err, "DNS resolution failed");
                }
            }
        }
        (out, ttl)
    }
}

/// All known services, by fully qualified host.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    services: HashMap<String, Arc<Service>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `service` under each of its hosts.
    pub fn insert(&mut self, service: Service) {
        let service = Arc::new(service);
        for host in &service.hosts {
            self.services.insert(host.clone(), Arc::clone(&service));
        }
    }

    /// Adds a static service with one port and `endpoints` (a shorthand for code).
    pub fn insert_static(
        &mut self,
        host: impl Into<String>,
        port: ServicePort,
        endpoints: Vec<WorkloadEntry>,
    ) {
        self.insert(Service {
            hosts: vec![host.into()],
            ports: vec![port],
            endpoints,
            resolution: Resolution::Static,
            ..Service::default()
        });
    }

    /// The service for `host`: exact host first, then the longest wildcard (`*.example.com`).
    pub fn service(&self, host: &str) -> Option<&Arc<Service>> {
        if let Some(s) = self.services.get(host) {
            return Some(s);
        }
        let mut rest = host;
        while let Some((_, tail)) = rest.split_once('.') {
            if let Some(s) = self.services.get(&format!("*.{tail}")) {
                return Some(s);
            }
            rest = tail;
        }
        self.services.get("*")
    }

    /// Marks, on the instances of services inside the mesh, the ports whose server takes
    /// plaintext only: `disabled(namespace, labels, port)` says whether the
    /// PeerAuthentication of the instance with `labels` in the service's `namespace`
    /// is `DISABLE` on its `port` (SR-24). Istio's control plane makes the same check
    /// for each endpoint it sends.
    pub fn mark_plaintext_servers(&mut self, disabled: impl Fn(&str, &Labels, u16) -> bool) {
        let mut marked: HashMap<*const Service, Arc<Service>> = HashMap::new();
        for service in self.services.values_mut() {
            if service.mesh_external {
                continue;
            }
            let key = Arc::as_ptr(service);
            if let Some(done) = marked.get(&key) {
                *service = Arc::clone(done);
                continue;
            }
            let mut copy = Service::clone(service);
            let Service {
                ports,
                endpoints,
                namespace,
                ..
            } = &mut copy;
            for w in endpoints.iter_mut() {
                w.plaintext_ports = ports
                    .iter()
                    .map(|p| w.port_for(p))
                    .filter(|&port| disabled(namespace, &w.labels, port))
                    .collect();
            }
            let copy = Arc::new(copy);
            marked.insert(key, Arc::clone(&copy));
            *service = copy;
        }
    }

    /// Whether `host` is known.
    pub fn contains(&self, host: &str) -> bool {
        self.service(host).is_some()
    }

    /// Every host.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ports_by_protocol_else_by_name_prefix() {
        let tcp =
            |name: &str, protocol: &str| ServicePort::new(1, name).with_protocol(protocol).is_tcp();
        assert!(tcp("tcp-redis", ""));
        assert!(tcp("redis", ""));
        assert!(tcp("Mongo-primary", ""));
        assert!(tcp("https", ""));
        assert!(tcp("whatever", "TCP"));
        assert!(tcp("http-admin", "TLS"));
        assert!(!tcp("http-web", ""));
        assert!(!tcp("tcpx", ""));
        assert!(!tcp("tcp-redis", "HTTP"));
        assert!(!tcp("", ""));
        let class = |name: &str, protocol: &str| {
            ServicePort::new(1, name).with_protocol(protocol).protocol()
        };
        assert_eq!(class("grpc", ""), PortProtocol::Http2);
        assert_eq!(class("grpc-web-ui", ""), PortProtocol::Http2);
        assert_eq!(class("x", "HTTP2"), PortProtocol::Http2);
        assert_eq!(class("x", "GRPC"), PortProtocol::Http2);
        assert_eq!(class("http-web", ""), PortProtocol::Http);
        assert_eq!(class("httpfoo", ""), PortProtocol::Auto);
        assert_eq!(class("", ""), PortProtocol::Auto);
        assert_eq!(class("https-api", ""), PortProtocol::Tls);
        assert_eq!(class("x", "TLS"), PortProtocol::Tls);
        assert_eq!(class("redis", ""), PortProtocol::Tcp);
        assert_eq!(class("x", "kubernetes.io/h2c"), PortProtocol::Http2);
        assert_eq!(class("x", "kubernetes.io/wss"), PortProtocol::Tls);
    }

    #[test]
    fn tls_mode_is_the_label_else_istio_when_a_service_account_is_named() {
        let port = ServicePort::new(80, "http");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let sa = Identity::parse("spiffe://cluster.local/ns/prod/sa/payment").unwrap();
        let with_sa = WorkloadEntry::new("10.0.0.1").with_identity(sa);
        assert_eq!(with_sa.endpoint(ip, &port, false).tls_mode, TlsMode::Istio);
        let opted_out = with_sa
            .clone()
            .with_labels([(mesh_core::TLS_MODE_LABEL, "disabled")]);
        assert_eq!(
            opted_out.endpoint(ip, &port, false).tls_mode,
            TlsMode::Disabled
        );
        let bare = WorkloadEntry::new("10.0.0.1");
        assert_eq!(bare.endpoint(ip, &port, false).tls_mode, TlsMode::Disabled);
        let labelled = bare.with_labels([(mesh_core::TLS_MODE_LABEL, "istio")]);
        assert_eq!(labelled.endpoint(ip, &port, false).tls_mode, TlsMode::Istio);
        // Never to a mesh-external service (SR-24).
        assert_eq!(
            labelled.endpoint(ip, &port, true).tls_mode,
            TlsMode::Disabled
        );
    }

    #[test]
    fn servers_that_disable_mtls_are_marked_per_port() {
        let mut reg = Registry::new();
        let mut svc = order_service();
        svc.namespace = "default".into();
        reg.insert(svc);
        // v2 (port 9090) takes plaintext only.
        reg.mark_plaintext_servers(|ns, labels, port| {
            ns == "default"
                && labels.get("version").map(String::as_str) == Some("v2")
                && port == 9090
        });
        let svc = reg
            .service("order-service.default.svc.cluster.local")
            .unwrap();
        let eps = svc.static_endpoints(svc.port(8080).unwrap(), &Labels::new());
        let modes: Vec<(u16, TlsMode)> =
            eps.iter().map(|e| (e.address.port(), e.tls_mode)).collect();
        assert_eq!(
            modes,
            [(8080, TlsMode::Disabled), (9090, TlsMode::Disabled)]
        );
        assert_eq!(svc.endpoints[1].plaintext_ports, [9090]);
        assert!(svc.endpoints[0].plaintext_ports.is_empty());
    }

    fn order_service() -> Service {
        Service {
            hosts: vec!["order-service.default.svc.cluster.local".into()],
            ports: vec![ServicePort::new(8080, "http")],
            endpoints: vec![
                WorkloadEntry::new("10.0.0.1").with_labels([("version", "v1")]),
                WorkloadEntry::new("10.0.0.2")
                    .with_labels([("version", "v2")])
                    .with_port("http", 9090)
                    .with_identity(
                        Identity::from_istio("cluster.local", "default", "order").unwrap(),
                    ),
            ],
            resolution: Resolution::Static,
            ..Service::default()
        }
    }

    #[test]
    fn static_endpoints_follow_labels_and_port_names() {
        let svc = order_service();
        let port = svc.port(8080).unwrap();
        let all = svc.static_endpoints(port, &Labels::new());
        assert_eq!(all.len(), 2);
        let v2 = svc.static_endpoints(port, &Labels::from([("version".into(), "v2".into())]));
        assert_eq!(v2.len(), 1);
        assert_eq!(v2[0].address, "10.0.0.2:9090".parse().unwrap());
        assert_eq!(
            v2[0].identities[0].as_str(),
            "spiffe://cluster.local/ns/default/sa/order"
        );
        let v1 = svc.static_endpoints(port, &Labels::from([("version".into(), "v1".into())]));
        assert_eq!(v1[0].address, "10.0.0.1:8080".parse().unwrap());
        let none = svc.static_endpoints(port, &Labels::from([("version".into(), "v9".into())]));
        assert!(none.is_empty());
    }

    #[test]
    fn wildcard_hosts_are_found_by_longest_suffix() {
        let mut reg = Registry::new();
        reg.insert(Service {
            hosts: vec!["*.example.com".into()],
            ..Service::default()
        });
        reg.insert(Service {
            hosts: vec!["*.api.example.com".into()],
            ports: vec![ServicePort::new(1, "x")],
            ..Service::default()
        });
        assert!(reg.service("a.example.com").unwrap().ports.is_empty());
        assert_eq!(reg.service("v1.api.example.com").unwrap().ports.len(), 1);
        assert!(reg.service("example.com").is_none());
    }

    #[tokio::test]
    async fn dns_service_resolves_its_instances_with_the_system_resolver() {
        let svc = Service {
            hosts: vec!["db.internal".into()],
            ports: vec![ServicePort::new(5432, "tcp")],
            endpoints: vec![
                WorkloadEntry::new("localhost").with_labels([("role", "primary")]),
                WorkloadEntry::new("no-such-host.invalid"),
            ],
            resolution: Resolution::Dns,
            ..Service::default()
        };
        let (eps, _) = svc
            .resolve_endpoints(
                &svc.ports[0],
                &Labels::from([("role".into(), "primary".into())]),
                &crate::dns::DnsResolver::system_or_none(),
            )
            .await;
        assert!(!eps.is_empty());
        assert!(
            eps.iter()
                .all(|e| e.address.ip().is_loopback() && e.address.port() == 5432)
        );
        assert_eq!(
            eps[0].labels.get("role").map(String::as_str),
            Some("primary")
        );
    }
}
