//! Route tables: the compiled, immutable routing of one listener (the sidecar's `mesh`
//! or one gateway).
//!
//! A [`RouteTable`] maps a request's host to a [`VirtualHost`] (exact name, then the
//! longest wildcard `*.suffix`, then `*`) and walks its routes in order: the first
//! [`Route`] with a matching block wins (VS-03/VS-04). A host with routes but no matching
//! route, or a host nobody configured, is [`NoRoute`] (404 `NR`, VS-05).
//!
//! Host names are fully qualified at compile time (VS-01: short names with the
//! VirtualService's namespace, then `.svc.<domain>`); the short forms a client may send
//! (`reviews`, `reviews.ns`, `reviews.ns.svc`) are indexed as aliases, so a lookup never
//! allocates.
//!
//! # Errors
//!
//! Selection returns [`NoRoute`]. Compilation errors are [`CompileError`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::error::NoRoute;

use crate::fault::{FaultPolicy, Percent};
use crate::headers::Headers;
use crate::matcher::{MatchError, RequestView, RouteMatch};
use crate::rewrite::{DirectResponse, Redirect, Rewrite};
use crate::weighted::{WeightError, Weighted};

/// The configuration cannot be compiled into a table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// A matcher or rewrite regex is invalid.
    #[error("{resource}: {source}")]
    Match {
        /// `namespace/name` of the VirtualService.
        resource: String,
        /// The matcher error.
        #[source]
        source: MatchError,
    },
    /// The route's weights do not form a distribution.
    #[error("{resource}: {source}")]
    Weights {
        /// `namespace/name` of the VirtualService.
        resource: String,
        /// The weight error.
        #[source]
        source: WeightError,
    },
    /// A field has a value the router cannot use.
    #[error("{resource}: {message}")]
    Invalid {
        /// `namespace/name` of the VirtualService.
        resource: String,
        /// What is wrong.
        message: String,
    },
}

/// A destination as a route names it: host, optional subset, optional port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationKey {
    /// Fully qualified host.
    pub host: Arc<str>,
    /// DestinationRule subset.
    pub subset: Option<Arc<str>>,
    /// Port; `None` means the service's (first) port.
    pub port: Option<u16>,
}

impl DestinationKey {
    /// A key for `host` (already qualified) with optional subset and port.
    pub fn new(host: &str, subset: Option<&str>, port: Option<u16>) -> Self {
        Self {
            host: Arc::from(host),
            subset: subset.map(Arc::from),
            port,
        }
    }
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Envoy's cluster naming: outbound|port|subset|host.
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port.map(|p| p.to_string()).unwrap_or_default(),
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

/// One weighted destination of a route, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteTarget {
    /// Index into [`RouteTable::destinations`].
    pub destination: usize,
    /// Index into [`RouteTable::stacks`] (this route's policy around this destination);
    /// assigned by [`TableBuilder::build`], whatever was set before.
    pub stack: usize,
    /// Destination-level header operations (applied after the route's).
    pub headers: Arc<Headers>,
}

/// A mirror destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    /// Index into [`RouteTable::destinations`].
    pub destination: usize,
    /// Share of requests copied.
    pub percent: Percent,
}

/// What a route does with a matching request.
#[derive(Clone, Debug)]
pub enum RouteAction {
    /// Forward to one of the weighted destinations.
    Forward(Weighted<RouteTarget>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    Direct(DirectResponse),
}

/// One HTTP route, compiled.
#[derive(Clone, Debug)]
pub struct Route {
    /// The route's `name`.
    pub name: Option<String>,
    /// Match blocks, ORed; empty matches everything.
    pub matches: Vec<RouteMatch>,
    /// What to do.
    pub action: RouteAction,
    /// Path and authority rewrite before forwarding.
    pub rewrite: Rewrite,
    /// Fault injection.
    pub fault: FaultPolicy,
    /// Route-level header operations.
    pub headers: Arc<Headers>,
    /// Mirrors.
    pub mirrors: Vec<Mirror>,
    /// The route's policies for the resilience layers.
    pub policy: Arc<mesh_core::extensions::RoutePolicy>,
    /// `corsPolicy`.
    pub cors: Option<Arc<crate::cors::CorsPolicy>>,
}

impl Route {
    /// The first block that matches `req`: `Some(None)` for a route without blocks.
    pub fn matching_block(&self, req: &RequestView<'_>) -> Option<Option<&RouteMatch>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find(|m| m.matches(req)).map(Some)
    }
}

/// The routes of one set of hosts (one VirtualService as seen by one listener).
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// `namespace/name` of the VirtualService (or the host for a default route).
    pub name: String,
    /// Hosts (qualified) this virtual host answers.
    pub hosts: Vec<String>,
    /// Routes, in order.
    pub routes: Vec<Route>,
    /// TCP routes (VirtualService `tcp`, or the service's own TCP ports), in order.
    pub tcp: Vec<TcpRule>,
    /// TLS routes (VirtualService `tls`: by SNI, the TLS left to the endpoints), in order.
    pub tls: Vec<TcpRule>,
}

/// One TCP or TLS route of a virtual host, compiled: a connection that one of `matches`
/// takes (every connection when empty) goes to one of the weighted destinations.
#[derive(Clone, Debug)]
pub struct TcpRule {
    /// The match blocks; empty: every connection.
    pub matches: Vec<L4Match>,
    /// Weighted destinations, as indexes into [`RouteTable::destinations`].
    pub destinations: Weighted<usize>,
}

/// One match block of a TCP or TLS route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Match {
    /// The destination port (`port`); `None`: every port.
    pub port: Option<u16>,
    /// The SNI names (`sniHosts`, `*.suffix` allowed); empty: any SNI.
    pub sni_hosts: Vec<String>,
    /// The destination addresses (`destinationSubnets`); empty: any address.
    pub destination_subnets: Vec<ipnet::IpNet>,
    /// The client's addresses (`sourceSubnet`); `None`: any client.
    pub source_subnet: Option<ipnet::IpNet>,
}

/// The addresses of a TCP connection a TCP route's `destinationSubnets` and
/// `sourceSubnet` are compared with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4Addresses {
    /// Where the client sent the connection: the original destination under
    /// transparent capture, else the listener's address.
    pub destination: Option<std::net::IpAddr>,
    /// The client's address.
    pub source: Option<std::net::IpAddr>,
}

impl L4Match {
    fn takes(&self, port: u16, sni: Option<&str>, addresses: &L4Addresses) -> bool {
        let within = |net: &ipnet::IpNet, ip: Option<std::net::IpAddr>| {
            ip.is_some_and(|ip| net.contains(&ip.to_canonical()))
        };
        self.port.is_none_or(|p| p == port)
            && (self.sni_hosts.is_empty()
                || sni.is_some_and(|sni| self.sni_hosts.iter().any(|h| sni_covers(h, sni))))
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| within(n, addresses.destination)))
            && self
                .source_subnet
                .as_ref()
                .is_none_or(|n| within(n, addresses.source))
    }

    /// Whether the block takes every connection to `port`, whatever its addresses and SNI.
    fn takes_every(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
            && self.sni_hosts.is_empty()
            && self.destination_subnets.is_empty()
            && self.source_subnet.is_none()
    }
}

/// Whether the `sniHosts` entry `pattern` (exact, or `*.suffix` for one or more labels)
/// covers `sni`, case-insensitively.
fn sni_covers(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => {
            sni.len() > suffix.len()
                && sni
                    .get(sni.len() - suffix.len()..)
                    .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(sni),
    }
}

impl TcpRule {
    /// Whether a connection to `port`, of unknown addresses, takes this rule.
    pub fn matches(&self, port: u16) -> bool {
        self.takes(port, None)
    }

    /// Whether a connection to `port` with TLS server name `sni` takes this rule.
    pub fn takes(&self, port: u16, sni: Option<&str>) -> bool {
        self.takes_connection(port, sni, &L4Addresses::default())
    }

    /// Whether a connection to `port` with TLS server name `sni`, between `addresses`,
    /// takes this rule.
    pub fn takes_connection(&self, port: u16, sni: Option<&str>, addresses: &L4Addresses) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.takes(port, sni, addresses))
    }

    /// Whether every connection to `port` takes this rule.
    fn takes_every(&self, port: u16) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.takes_every(port))
    }
}

/// The route chosen for a request.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'a> {
    /// The virtual host.
    pub virtual_host: &'a VirtualHost,
    /// The route.
    pub route: &'a Route,
    /// The block that matched (`None` for a route without blocks).
    pub matched: Option<&'a RouteMatch>,
}

/// How short host names are qualified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    /// The namespace of the proxy (short names a client sends are qualified with it).
    pub namespace: String,
    /// The cluster domain, `cluster.local` by default.
    pub domain: String,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            domain: "cluster.local".into(),
        }
    }
}

impl Naming {
    /// Qualifies `host` as written in a resource of `namespace` (VS-01): a name without a
    /// dot becomes `host.namespace.svc.<domain>`; wildcards, IPs and dotted names stay.
    pub fn qualify(&self, host: &str, namespace: &str) -> String {
        if host == "*" || host.starts_with("*.") || host.contains('.') || host.contains(':') {
            host.to_ascii_lowercase()
        } else {
            format!(
                "{}.{namespace}.svc.{}",
                host.to_ascii_lowercase(),
                self.domain
            )
        }
    }

    /// The short forms of a qualified Kubernetes host a client of this proxy may send.
    fn aliases(&self, fqdn: &str) -> Vec<String> {
        let suffix = format!(".svc.{}", self.domain);
        let Some(base) = fqdn.strip_suffix(&suffix) else {
            return Vec::new();
        };
        let Some((name, ns)) = base.split_once('.') else {
            return Vec::new();
        };
        if ns.contains('.') {
            return Vec::new();
        }
        let mut out = vec![format!("{name}.{ns}"), format!("{name}.{ns}.svc")];
        if ns == self.namespace {
            out.push(name.to_owned());
        }
        out
    }
}

/// The compiled routing of one listener; immutable, shared as an `Arc`.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, usize>,
    /// `(suffix including the dot, index)`, longest suffix first.
    wildcards: Vec<(String, usize)>,
    catch_all: Option<usize>,
    virtual_hosts: Vec<VirtualHost>,
    destinations: Vec<DestinationKey>,
    stacks: Vec<RouteStack>,
    naming: Naming,
    /// The protocol class of each registry service port, by (host, port).
    ports: HashMap<(String, u16), crate::registry::PortProtocol>,
}

/// One route's policy around one of its destinations: what a router builds a service for
/// when the table is compiled, so that nothing of the route's policy is built per request.
/// Routes sharing a policy (the same `Arc`) and a destination share the entry.
#[derive(Clone, Debug)]
pub struct RouteStack {
    /// The route's policy (timeout, retries).
    pub policy: Arc<mesh_core::extensions::RoutePolicy>,
    /// Index into [`RouteTable::destinations`].
    pub destination: usize,
}

impl RouteTable {
    /// A table builder qualifying names with `naming`.
    pub fn builder(naming: Naming) -> TableBuilder {
        TableBuilder {
            table: RouteTable {
                naming,
                ..RouteTable::default()
            },
            dest_index: HashMap::new(),
        }
    }

    /// How names are qualified.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    /// The protocol class of port `port` of the registry service `host` (qualified, as
    /// the table names hosts); `None` when the registry has no such port.
    pub fn port_protocol(&self, host: &str, port: u16) -> Option<crate::registry::PortProtocol> {
        self.ports.get(&(host.to_ascii_lowercase(), port)).copied()
    }

    /// Every destination some route (or mirror) names; routes refer to them by index.
    pub fn destinations(&self) -> &[DestinationKey] {
        &self.destinations
    }

    /// Every (route policy, destination) pair some route forwards through; a
    /// [`RouteTarget::stack`] indexes it.
    pub fn stacks(&self) -> &[RouteStack] {
        &self.stacks
    }

    /// The virtual hosts.
    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }

    /// The TCP rule for a connection to `host` on `port`: the first rule of the host's
    /// virtual host that matches the port.
    pub fn tcp_rule(&self, host: &str, port: u16) -> Option<&TcpRule> {
        self.tcp_rule_for(host, port, &L4Addresses::default())
    }

    /// The TCP rule for a connection to `host` on `port` between `addresses`: the first
    /// rule of the host's virtual host that takes it (port, `destinationSubnets`,
    /// `sourceSubnet`).
    pub fn tcp_rule_for(&self, host: &str, port: u16, addresses: &L4Addresses) -> Option<&TcpRule> {
        self.virtual_host(host)?
            .tcp
            .iter()
            .find(|rule| rule.takes_connection(port, None, addresses))
    }

    /// The TLS rule for a connection to `port` whose ClientHello names `sni`: the first
    /// TLS rule, of the virtual host answering `sni`, that takes it.
    pub fn tls_rule(&self, sni: &str, port: u16) -> Option<&TcpRule> {
        self.virtual_host(sni)?
            .tls
            .iter()
            .find(|rule| rule.takes(port, Some(sni)))
    }

    /// The virtual host answering `host` (no port), case-insensitively.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_hosts.get(self.virtual_host_index(host)?)
    }

    /// The index (into [`virtual_hosts`](Self::virtual_hosts)) of the virtual host
    /// answering `host` (no port), case-insensitively: resolve once, then
    /// [`select_in`](Self::select_in).
    pub fn virtual_host_index(&self, host: &str) -> Option<usize> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        self.exact.get(host).copied().or_else(|| {
            self.wildcards
                .iter()
                .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                .map(|(_, i)| *i)
                .or(self.catch_all)
        })
    }

    /// The route for `req`: first virtual host, then first matching route.
    pub fn select<'a>(&'a self, req: &RequestView<'_>) -> Result<Selected<'a>, NoRoute> {
        self.select_in(self.virtual_host_index(req.host).ok_or(NoRoute)?, req)
    }

    /// The first route of virtual host `index` matching `req` (the host already resolved
    /// with [`virtual_host_index`](Self::virtual_host_index)).
    pub fn select_in<'a>(
        &'a self,
        index: usize,
        req: &RequestView<'_>,
    ) -> Result<Selected<'a>, NoRoute> {
        let vh = self.virtual_hosts.get(index).ok_or(NoRoute)?;
        for route in &vh.routes {
            if let Some(matched) = route.matching_block(req) {
                return Ok(Selected {
                    virtual_host: vh,
                    route,
                    matched,
                });
            }
        }
        Err(NoRoute)
    }
}

/// Builds a [`RouteTable`] from virtual hosts made in code or compiled from configuration.
#[derive(Debug)]
pub struct TableBuilder {
    table: RouteTable,
    dest_index: HashMap<DestinationKey, usize>,
}

impl TableBuilder {
    /// The index of `key` in the table's destinations, adding it if new.
    pub fn destination(&mut self, key: DestinationKey) -> usize {
        if let Some(&i) = self.dest_index.get(&key) {
            return i;
        }
        let i = self.table.destinations.len();
        self.table.destinations.push(key.clone());
        self.dest_index.insert(key, i);
        i
    }

    /// How names are qualified.
    pub fn naming(&self) -> &Naming {
        &self.table.naming
    }

    /// Whether some virtual host already answers exactly `host`.
    pub fn has_host(&self, host: &str) -> bool {
        self.table.exact.contains_key(host)
            || (host == "*" && self.table.catch_all.is_some())
            || self
                .table
                .wildcards
                .iter()
                .any(|(s, _)| host.strip_prefix('*') == Some(s.as_str()))
    }

    /// Records the protocol class of port `port` of the registry service `host`.
    pub fn port_protocol(
        &mut self,
        host: &str,
        port: u16,
        protocol: crate::registry::PortProtocol,
    ) {
        self.table
            .ports
            .insert((host.to_ascii_lowercase(), port), protocol);
    }

    /// Gives `host`'s virtual host a TCP rule to `(host, port)` unless one of its rules
    /// already takes every connection to `port` (the service's own TCP port, under a
    /// VirtualService without a `tcp` route for it, or whose routes for it match only
    /// some addresses).
    pub fn default_tcp(&mut self, host: &str, port: u16) {
        let Some(&vh) = self.table.exact.get(host) else {
            return;
        };
        if self.table.virtual_hosts[vh]
            .tcp
            .iter()
            .any(|r| r.takes_every(port))
        {
            return;
        }
        let dest = self.destination(DestinationKey::new(host, None, Some(port)));
        self.table.virtual_hosts[vh].tcp.push(TcpRule {
            matches: vec![L4Match {
                port: Some(port),
                ..L4Match::default()
            }],
            destinations: Weighted::single(dest),
        });
    }

    /// Adds a virtual host. A host already taken by an earlier virtual host stays with
    /// it (Istio keeps the oldest VirtualService for a host); that host is skipped here.
    pub fn virtual_host(&mut self, vh: VirtualHost) -> &mut Self {
        let idx = self.table.virtual_hosts.len();
        let mut claimed = false;
        for host in &vh.hosts {
            if host == "*" {
                if self.table.catch_all.is_none() {
                    self.table.catch_all = Some(idx);
                    claimed = true;
                }
            } else if let Some(suffix) = host.strip_prefix('*') {
                if !self.table.wildcards.iter().any(|(s, _)| s == suffix) {
                    self.table.wildcards.push((suffix.to_owned(), idx));
                    claimed = true;
                }
            } else {
                let mut names = vec![host.clone()];
                names.extend(self.table.naming.aliases(host));
                for name in names {
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        self.table.exact.entry(name)
                    {
                        e.insert(idx);
                        claimed = true;
                    }
                }
            }
        }
        if claimed {
            self.table.virtual_hosts.push(vh);
        }
        self
    }

    /// The finished table: wildcard hosts ordered longest first, and one
    /// [`RouteStack`] per distinct (route policy, destination) pair, indexed from each
    /// [`RouteTarget::stack`].
    pub fn build(mut self) -> RouteTable {
        self.table
            .wildcards
            .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        let mut index: HashMap<(*const mesh_core::extensions::RoutePolicy, usize), usize> =
            HashMap::new();
        let mut stacks = Vec::new();
        for vh in &mut self.table.virtual_hosts {
            for route in &mut vh.routes {
                let RouteAction::Forward(weighted) = &mut route.action else {
                    continue;
                };
                for target in weighted.items_mut() {
                    let key = (Arc::as_ptr(&route.policy), target.destination);
                    target.stack = *index.entry(key).or_insert_with(|| {
                        stacks.push(RouteStack {
                            policy: Arc::clone(&route.policy),
                            destination: target.destination,
                        });
                        stacks.len() - 1
                    });
                }
            }
        }
        self.table.stacks = stacks;
        self.table
    }
}

/// A route forwarding everything to one destination (Istio's default route for a known
/// service without a VirtualService).
pub fn default_route(destination: usize) -> Route {
    Route {
        name: Some("default".into()),
        matches: Vec::new(),
        action: RouteAction::Forward(Weighted::single(RouteTarget {
            destination,
            stack: 0,
            headers: Arc::default(),
        })),
        rewrite: Rewrite::default(),
        fault: FaultPolicy::default(),
        headers: Arc::default(),
        mirrors: Vec::new(),
        policy: Arc::default(),
        cors: None,
    }
}

/// A route's timeout as a duration; `0s` disables it (VS-40).
pub fn effective_timeout(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|d| !d.is_zero())
}
