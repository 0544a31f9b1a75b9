//! Which service owns a captured connection's original destination.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::config::MeshConfig;
use mesh_routing::{Naming, PortProtocol, ServicePort};

/// The service that owns an address and port, and how its port is proxied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The service's host (fully qualified, as routes name it).
    pub host: Arc<str>,
    /// The protocol class of the port.
    pub protocol: PortProtocol,
}

#[derive(Clone, Debug)]
struct Entry {
    host: Arc<str>,
    ports: HashMap<u16, PortProtocol>,
}

/// The virtual addresses of the services a sidecar sees: ServiceEntry `spec.addresses`
/// (IPs or CIDRs), which for Kubernetes Services `discovery` fills with their
/// ClusterIPs. Istio builds one outbound listener per address and port from the same
/// field (ISTIO.md TC-10, PS-30).
///
/// An address that two services claim goes to the one loaded first; a more specific
/// range wins over a wider one.
#[derive(Clone, Debug, Default)]
pub struct Addresses {
    exact: HashMap<IpAddr, Vec<usize>>,
    ranges: Vec<(IpNet, usize)>,
    entries: Vec<Entry>,
    /// Ports that some service serves over HTTP (or with an undeclared protocol).
    http_ports: BTreeSet<u16>,
}

impl Addresses {
    /// The addresses of `config`'s ServiceEntries, hosts qualified with `naming`.
    pub fn from_config(config: &MeshConfig, naming: &Naming) -> Self {
        let mut index = Self::default();
        for se in config.service_entries() {
            let spec = &se.spec;
            let Some(host) = spec.hosts.first() else {
                continue;
            };
            let ports: HashMap<u16, PortProtocol> = spec
                .ports
                .iter()
                .filter_map(|p| {
                    let number = u16::try_from(p.number).ok()?;
                    let port =
                        ServicePort::new(number, p.name.clone()).with_protocol(p.protocol.clone());
                    Some((number, port.protocol()))
                })
                .collect();
            index.http_ports.extend(
                ports
                    .iter()
                    .filter(|(_, p)| **p != PortProtocol::Tcp)
                    .map(|(n, _)| *n),
            );
            let id = index.entries.len();
            for address in &spec.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    index.exact.entry(ip).or_default().push(id);
                } else if let Ok(net) = address.parse::<IpNet>() {
                    index.ranges.push((net.trunc(), id));
                }
            }
            index.entries.push(Entry {
                host: Arc::from(naming.qualify(host, &se.metadata.namespace)),
                ports,
            });
        }
        // Longest prefix first; a stable sort keeps load order among equals.
        index
            .ranges
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        index
    }

    /// The service whose address is `destination`'s IP and which has its port.
    pub fn owner(&self, destination: SocketAddr) -> Option<Owner> {
        let port = destination.port();
        self.claimants(destination.ip()).find_map(|entry| {
            let protocol = *entry.ports.get(&port)?;
            Some(Owner {
                host: entry.host.clone(),
                protocol,
            })
        })
    }

    /// The service that owns `ip` at all (whatever the port), for HTTP requests whose
    /// Host names nothing.
    pub fn host_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.claimants(ip).next().map(|e| e.host.clone())
    }

    /// The entries that claim `ip`, in precedence order: exact addresses, then ranges.
    fn claimants(&self, ip: IpAddr) -> impl Iterator<Item = &Entry> {
        let ip = ip.to_canonical();
        let exact = self.exact.get(&ip).into_iter().flatten();
        let ranges = self
            .ranges
            .iter()
            .filter(move |(net, _)| net.contains(&ip))
            .map(|(_, id)| id);
        exact.chain(ranges).filter_map(|id| self.entries.get(*id))
    }

    /// Whether some service serves `port` over HTTP or with an undeclared protocol: a
    /// captured connection to an unknown address on that port is read as HTTP and
    /// routed by its Host (Istio's `0.0.0.0:<port>` HTTP listener).
    pub fn is_http_port(&self, port: u16) -> bool {
        self.http_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::LoadOptions;

    fn config(yaml: &str) -> MeshConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("se.yaml"), yaml).unwrap();
        let options = LoadOptions {
            default_namespace: "production".into(),
            ..LoadOptions::default()
        };
        MeshConfig::load(&[dir.path().to_path_buf()], &options)
            .map(|(c, _)| c)
            .unwrap()
    }

    #[test]
    fn addresses_and_ranges_find_their_service_and_port() {
        let c = config(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: production}
spec:
  hosts: [payment-service]
  addresses: [10.96.0.10, fd00:96::10]
  ports: [{number: 8080, name: http}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.example.com]
  addresses: [10.97.0.0/16]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}, {number: 9000, name: web}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.3}]
",
        );
        let index = Addresses::from_config(&c, &Naming::default());
        let owner = index.owner("10.96.0.10:8080".parse().unwrap()).unwrap();
        assert_eq!(&*owner.host, "payment-service.production.svc.cluster.local");
        assert_eq!(owner.protocol, PortProtocol::Http);
        assert!(index.owner("[fd00:96::10]:8080".parse().unwrap()).is_some());
        // An IPv4 address seen on a dual-stack socket.
        assert!(
            index
                .owner("[::ffff:10.96.0.10]:8080".parse().unwrap())
                .is_some()
        );
        assert!(index.owner("10.96.0.10:9999".parse().unwrap()).is_none());
        let db = index.owner("10.97.3.4:5432".parse().unwrap()).unwrap();
        assert_eq!(&*db.host, "db.example.com");
        assert_eq!(db.protocol, PortProtocol::Tcp);
        assert!(index.owner("10.98.0.1:5432".parse().unwrap()).is_none());
        assert_eq!(
            index.host_of("10.96.0.10".parse().unwrap()).as_deref(),
            Some("payment-service.production.svc.cluster.local")
        );
        assert!(index.is_http_port(8080) && index.is_http_port(9000));
        assert!(!index.is_http_port(5432));
    }
}
