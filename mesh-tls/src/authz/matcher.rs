//! The compiled policy set and its evaluation.
//!
//! Compilation validates every value once (CIDRs, ports, header names, URI templates) and
//! turns Istio's string forms into [`StrMatch`]es, so a decision does no parsing, no regex
//! and no allocation (except for joining a header that was sent more than once).
//!
//! Evaluation uses three-valued logic: an attribute the proxy cannot know (HTTP and JWT
//! attributes on a TCP connection, connection facts absent from the request, the TLS server name, a header
//! value that is not valid text) is *unknown*, and a predicate on it is unknown too; `and`,
//! `or` and `not` follow Kleene's rules. An ALLOW rule matches only when it is *true*;
//! a DENY or AUDIT rule matches when it is true *or unknown*. So an unknowable attribute
//! can only ever narrow what is allowed and widen what is denied.
//!
//! Rules are indexed by a key the request must produce for the rule to be true or
//! unknown (see `CompiledRule::index_keys`): the exact principal, a `/`-bounded prefix
//! or suffix of it (`cluster.local/ns/x/*`, `*/sa/y`), the literal namespace, the exact
//! path or a `/`-bounded path prefix (`/api/v1/*`, `/api/{*}/x`). A decision looks up
//! at most `MAX_LISTS` sorted candidate lists and merges them with the rules that
//! have no key, so it visits only the rules that can apply, in declaration order. Keys
//! come only from positive fields whose predicate is never unknown on the path they are
//! looked up on (principals and namespaces are false without a peer); on TCP
//! connections, where paths are unknown, every path-keyed rule is visited. A unit
//! proptest checks that the indexed and the linear evaluation decide identically.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header::HeaderName;
use ipnet::IpNet;
use mesh_core::Identity;
use mesh_core::extensions::{AuthzDecision, ConnectionInfo, DryRunDecision, MatchedPolicy};

use super::policy::{Action, Condition, Operation, Policy, Rule, Source, Workload};
use crate::authn::RequestAuth;

/// The TLS server name (SNI) of the connection, for `connection.sni` conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerName<'a> {
    /// The connection's SNI, or `None` when the connection has none (e.g. plaintext).
    Known(Option<&'a str>),
    /// Not known to this layer: `connection.sni` conditions evaluate as unknown.
    #[default]
    Unknown,
}

/// What a decision looks at: a borrowed view of the request and its connection.
#[derive(Clone, Copy, Debug)]
pub struct RequestAttributes<'a> {
    /// The HTTP method (upper case).
    pub method: &'a str,
    /// The canonical path, without query or fragment.
    pub path: &'a str,
    /// The `Host` header or the `:authority`, as sent.
    pub host: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The verified peer identity; `None` for plaintext callers.
    pub peer: Option<&'a Identity>,
    /// The downstream connection (source and destination addresses).
    pub connection: Option<&'a ConnectionInfo>,
    /// The original client address (`remote.ip`, `remoteIpBlocks`), derived from
    /// `X-Forwarded-For` and the number of trusted proxies; the peer address when `None`.
    pub remote_ip: Option<IpAddr>,
    /// The TLS server name.
    pub server_name: ServerName<'a>,
    /// The request's validated JWT (set by [`AuthnLayer`](crate::authn::AuthnLayer));
    /// `None` when the request carried none.
    pub request_auth: Option<&'a RequestAuth>,
}

/// An AuthorizationPolicy that cannot be compiled; the whole policy set is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {policy}: {field}: {message}")]
pub struct PolicyError {
    /// `<namespace>/<name>` of the policy.
    pub policy: String,
    /// Where in the spec, e.g. `rules[0].from[1].source.ipBlocks[2]`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tri {
    False,
    True,
    Unknown,
}

impl Tri {
    fn from_bool(b: bool) -> Self {
        if b { Tri::True } else { Tri::False }
    }
    fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::False, _) | (_, Tri::False) => Tri::False,
            (Tri::True, Tri::True) => Tri::True,
            _ => Tri::Unknown,
        }
    }
    fn or(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::True, _) | (_, Tri::True) => Tri::True,
            (Tri::False, Tri::False) => Tri::False,
            _ => Tri::Unknown,
        }
    }
    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Unknown => Tri::Unknown,
        }
    }
}

/// One of Istio's four string forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    /// `abc`
    Exact(Box<str>),
    /// `abc*`: starts with `abc` (including `abc` itself).
    Prefix(Box<str>),
    /// `*abc`: ends with `abc` (including `abc` itself).
    Suffix(Box<str>),
    /// `*`: any non-empty value.
    Presence,
}

impl StrMatch {
    pub(crate) fn parse(v: &str) -> Self {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(suffix) = v.strip_prefix('*') {
            StrMatch::Suffix(suffix.into())
        } else if let Some(prefix) = v.strip_suffix('*') {
            StrMatch::Prefix(prefix.into())
        } else {
            StrMatch::Exact(v.into())
        }
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == &**e,
            StrMatch::Prefix(p) => s.starts_with(&**p),
            StrMatch::Suffix(x) => s.ends_with(&**x),
            StrMatch::Presence => !s.is_empty(),
        }
    }

    fn matches_ignore_case(&self, s: &str) -> bool {
        let s = s.as_bytes();
        match self {
            StrMatch::Exact(e) => s.eq_ignore_ascii_case(e.as_bytes()),
            StrMatch::Prefix(p) => {
                s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Suffix(x) => {
                s.len() >= x.len() && s[s.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
            }
            StrMatch::Presence => !s.is_empty(),
        }
    }
}

/// A namespace pattern: `*` anywhere stands for any run of characters (Istio compiles
/// namespaces to a regex where `*` becomes `.*`); everything else is literal.
#[derive(Clone, Debug)]
struct Glob(Box<[Box<str>]>);

impl Glob {
    fn parse(v: &str) -> Self {
        Glob(v.split('*').map(Into::into).collect())
    }

    fn matches(&self, s: &str) -> bool {
        let parts = &self.0;
        let (first, rest) = match parts.split_first() {
            Some(x) => x,
            None => return s.is_empty(),
        };
        if rest.is_empty() {
            return s == &**first;
        }
        let Some(mut s) = s.strip_prefix(&**first) else {
            return false;
        };
        let (last, middle) = match rest.split_last() {
            Some(x) => x,
            None => return false,
        };
        for part in middle {
            match s.find(&**part) {
                Some(i) => s = &s[i + part.len()..],
                None => return false,
            }
        }
        s.ends_with(&**last)
    }
}

#[derive(Clone, Debug)]
enum Segment {
    Literal(Box<str>),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: the rest of the path, zero or more segments (last only).
    Rest,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Str(StrMatch),
    /// The segments and the literal leading segments as a prefix (`/a/b/` for
    /// `/a/b/{*}/c`; empty when the template starts with a wildcard).
    Template(Box<[Segment]>, Box<str>),
}

impl PathMatch {
    fn parse(v: &str) -> Result<Self, String> {
        if !(v.contains("{*}") || v.contains("{**}")) {
            return Ok(PathMatch::Str(StrMatch::parse(v)));
        }
        let Some(rest) = v.strip_prefix('/') else {
            return Err(format!("URI template `{v}` must start with `/`"));
        };
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            segments.push(match *s {
                "{*}" => Segment::One,
                "{**}" if i + 1 == raw.len() => Segment::Rest,
                "{**}" => {
                    return Err(format!(
                        "URI template `{v}`: `{{**}}` must be the last segment"
                    ));
                }
                lit if lit.contains('{') || lit.contains('}') => {
                    return Err(format!(
                        "URI template `{v}`: `{{*}}` and `{{**}}` must be whole path segments"
                    ));
                }
                lit => Segment::Literal(lit.into()),
            });
        }
        let mut prefix = String::new();
        for s in &segments {
            match s {
                Segment::Literal(l) => {
                    prefix.push('/');
                    prefix.push_str(l);
                }
                Segment::One | Segment::Rest => break,
            }
        }
        if !prefix.is_empty() {
            // A wildcard segment follows, so a matching path continues with a `/`.
            prefix.push('/');
        }
        Ok(PathMatch::Template(segments.into(), prefix.into()))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(template, _) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut segments = rest.split('/');
                for t in template.iter() {
                    match t {
                        Segment::Rest => return segments.next().is_some(),
                        Segment::One => match segments.next() {
                            Some(s) if !s.is_empty() => {}
                            _ => return false,
                        },
                        Segment::Literal(l) => {
                            if segments.next() != Some(&**l) {
                                return false;
                            }
                        }
                    }
                }
                segments.next().is_none()
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Field {
    Principal(Box<[StrMatch]>),
    Namespace(Box<[Glob]>),
    TrustDomain(Box<[StrMatch]>),
    ServiceAccount(Box<[(Box<str>, Box<str>)]>),
    SourceIp(Box<[Cidr]>),
    RemoteIp(Box<[Cidr]>),
    DestinationIp(Box<[Cidr]>),
    Port(Box<[u16]>),
    Host(Box<[StrMatch]>),
    Method(Box<[StrMatch]>),
    Path(Box<[PathMatch]>),
    Header(HeaderName, Box<[StrMatch]>),
    Sni(Box<[StrMatch]>),
    /// `requestPrincipals`: (issuer, subject) matchers, from a value split at its last
    /// `/` (RA-09).
    RequestPrincipal(Box<[(StrMatch, StrMatch)]>),
    /// `request.auth.principal`: the whole `<iss>/<sub>`.
    AuthPrincipal(Box<[StrMatch]>),
    /// `request.auth.audiences`, `.presenter`, `.claims[...]`: the string values of a
    /// claim (RA-10).
    Claim(Box<[Box<str>]>, Box<[StrMatch]>),
}

#[derive(Clone, Debug)]
struct Pred {
    field: Field,
    negate: bool,
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A validated CIDR range as network and mask, so a test is one `and` and compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Cidr {
    fn new(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => Cidr::V4 {
                net: u32::from(n.network()),
                mask: u32::from(n.netmask()),
            },
            IpNet::V6(n) => Cidr::V6 {
                net: u128::from(n.network()),
                mask: u128::from(n.netmask()),
            },
        }
    }

    /// `ip` must be canonical ([`canonical_ip`]); IPv4 ranges never contain IPv6
    /// addresses and the reverse.
    fn contains(self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Cidr::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == net,
            (Cidr::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == net,
            _ => false,
        }
    }
}

fn ip_in(nets: &[Cidr], ip: Option<IpAddr>) -> Tri {
    match ip {
        Some(ip) => {
            let ip = canonical_ip(ip);
            Tri::from_bool(nets.iter().any(|n| n.contains(ip)))
        }
        None => Tri::Unknown,
    }
}

/// The host without a port and without a trailing dot.
fn bare_host(host: &str) -> &str {
    let host = if host.starts_with('[') {
        match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(i) if host[..i].find(':').is_none() => &host[..i],
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, ms: &[StrMatch]) -> Tri {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Tri::False;
    };
    let Some(second) = values.next() else {
        return match first.to_str() {
            Ok(v) => Tri::from_bool(ms.iter().any(|m| m.matches(trim_ows(v)))),
            Err(_) => Tri::Unknown,
        };
    };
    // Duplicates are joined with ", " (RFC 9110 §5.3) and the whole field is matched.
    // A backend may read only one of the lines, so when a single line matches but the
    // joined field does not, the result is unknown: a DENY still applies and an ALLOW
    // (or a notValues exclusion) does not.
    let mut joined = String::new();
    let mut line_matches = false;
    for v in [first, second].into_iter().chain(values) {
        let Ok(v) = v.to_str() else {
            return Tri::Unknown;
        };
        let v = trim_ows(v);
        line_matches |= ms.iter().any(|m| m.matches(v));
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(v);
    }
    if ms.iter().any(|m| m.matches(&joined)) {
        Tri::True
    } else if line_matches {
        Tri::Unknown
    } else {
        Tri::False
    }
}

/// Facts derived from the request at most once per decision, shared by every rule.
struct Facts<'a> {
    a: &'a RequestAttributes<'a>,
    /// False on a TCP connection: HTTP-only attributes are unknown.
    http: bool,
    /// Evaluate every rule without the index (tests compare both paths).
    linear: bool,
    principal: Option<&'a str>,
    istio: OnceCell<Option<(&'a str, &'a str)>>,
    bare_host: OnceCell<Option<&'a str>>,
}

impl<'a> Facts<'a> {
    fn new(a: &'a RequestAttributes<'a>, http: bool) -> Self {
        Facts {
            a,
            http,
            linear: false,
            principal: a.peer.map(Identity::principal),
            istio: OnceCell::new(),
            bare_host: OnceCell::new(),
        }
    }

    /// Namespace and service account of an Istio-form peer ID.
    fn istio(&self) -> Option<(&'a str, &'a str)> {
        *self.istio.get_or_init(|| {
            let peer = self.a.peer?;
            Some((peer.namespace()?, peer.service_account()?))
        })
    }

    fn namespace(&self) -> Option<&'a str> {
        self.istio().map(|(ns, _)| ns)
    }

    fn bare_host(&self) -> Option<&'a str> {
        *self.bare_host.get_or_init(|| self.a.host.map(bare_host))
    }
}

/// The rule index hashes a principal by its length and last 16 bytes, where principals
/// of one trust domain differ (`…/sa/<name>`): a constant-time hash, and collisions only
/// cost a string comparison. Principals come from verified certificates.
#[derive(Clone, Copy, Debug, Default)]
struct TailHash(u64);

impl std::hash::Hasher for TailHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(16)..];
        let mut h = self.0 ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for chunk in tail.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29);
        }
        self.0 = h;
    }
}

type IndexHasher = std::hash::BuildHasherDefault<TailHash>;

impl Field {
    /// Evaluation order inside a source or operation: cheap and selective first.
    fn cost(&self) -> u8 {
        match self {
            Field::Method(_) => 0,
            Field::Port(_) => 1,
            Field::Principal(_) => 2,
            Field::ServiceAccount(_) => 3,
            Field::TrustDomain(_) => 4,
            Field::SourceIp(_) | Field::DestinationIp(_) | Field::RemoteIp(_) => 5,
            Field::Path(_) => 6,
            Field::Namespace(_) => 7,
            Field::Host(_) | Field::Sni(_) => 8,
            Field::Header(..) => 9,
            Field::RequestPrincipal(_) | Field::AuthPrincipal(_) | Field::Claim(..) => 10,
        }
    }
}

impl Pred {
    fn eval(&self, f: &Facts<'_>) -> Tri {
        let a = f.a;
        let http_only = matches!(
            self.field,
            Field::Host(_)
                | Field::Method(_)
                | Field::Path(_)
                | Field::Header(..)
                | Field::RequestPrincipal(_)
                | Field::AuthPrincipal(_)
                | Field::Claim(..)
        );
        if http_only && !f.http {
            return Tri::Unknown;
        }
        let hit = match &self.field {
            Field::Principal(ms) => match f.principal {
                Some(p) => Tri::from_bool(ms.iter().any(|m| m.matches(p))),
                None => Tri::False,
            },
            Field::Namespace(gs) => match f.namespace() {
                Some(ns) => Tri::from_bool(gs.iter().any(|g| g.matches(ns))),
                None => Tri::False,
            },
            Field::TrustDomain(ms) => match a.peer {
                Some(id) => Tri::from_bool(ms.iter().any(|m| m.matches(id.trust_domain()))),
                None => Tri::False,
            },
            Field::ServiceAccount(sas) => match f.istio() {
                Some((ns, sa)) => Tri::from_bool(sas.iter().any(|(n, s)| &**n == ns && &**s == sa)),
                None => Tri::False,
            },
            Field::SourceIp(nets) => ip_in(nets, a.connection.map(|c| c.remote.ip())),
            Field::RemoteIp(nets) => ip_in(
                nets,
                a.remote_ip.or_else(|| a.connection.map(|c| c.remote.ip())),
            ),
            Field::DestinationIp(nets) => ip_in(nets, a.connection.map(|c| c.local.ip())),
            Field::Port(ports) => match a.connection {
                Some(c) => Tri::from_bool(ports.contains(&c.local.port())),
                None => Tri::Unknown,
            },
            Field::Host(ms) => match (a.host, f.bare_host()) {
                (Some(h), Some(bare)) => Tri::from_bool(
                    ms.iter()
                        .any(|m| m.matches_ignore_case(h) || m.matches_ignore_case(bare)),
                ),
                _ => Tri::False,
            },
            Field::Method(ms) => Tri::from_bool(ms.iter().any(|m| m.matches(a.method))),
            Field::Path(ps) => Tri::from_bool(ps.iter().any(|p| p.matches(a.path))),
            Field::Header(name, ms) => header_matches(a.headers, name, ms),
            Field::Sni(ms) => match a.server_name {
                ServerName::Known(Some(sni)) => {
                    Tri::from_bool(ms.iter().any(|m| m.matches_ignore_case(sni)))
                }
                ServerName::Known(None) => Tri::False,
                ServerName::Unknown => Tri::Unknown,
            },
            Field::RequestPrincipal(ms) => {
                match a
                    .request_auth
                    .and_then(|r| Some((r.issuer()?, r.subject()?)))
                {
                    Some((iss, sub)) => {
                        Tri::from_bool(ms.iter().any(|(mi, ms)| mi.matches(iss) && ms.matches(sub)))
                    }
                    None => Tri::False,
                }
            }
            Field::AuthPrincipal(ms) => match a.request_auth.and_then(RequestAuth::principal) {
                Some(p) => Tri::from_bool(ms.iter().any(|m| m.matches(p))),
                None => Tri::False,
            },
            Field::Claim(path, ms) => match a.request_auth {
                Some(r) => {
                    let path: Vec<&str> = path.iter().map(|p| &**p).collect();
                    Tri::from_bool(
                        r.claim_strings(&path)
                            .iter()
                            .any(|v| ms.iter().any(|m| m.matches(v))),
                    )
                }
                None => Tri::False,
            },
        };
        if self.negate { hit.not() } else { hit }
    }
}

fn all(preds: &[Pred], f: &Facts<'_>) -> Tri {
    let mut acc = Tri::True;
    for p in preds {
        acc = acc.and(p.eval(f));
        if acc == Tri::False {
            break;
        }
    }
    acc
}

fn any_entry(entries: &[Box<[Pred]>], f: &Facts<'_>) -> Tri {
    if entries.is_empty() {
        return Tri::True;
    }
    let mut acc = Tri::False;
    for e in entries {
        acc = acc.or(all(e, f));
        if acc == Tri::True {
            break;
        }
    }
    acc
}

#[derive(Clone, Debug)]
struct CompiledRule {
    /// Empty: any source.
    from: Box<[Box<[Pred]>]>,
    /// Empty: any operation.
    to: Box<[Box<[Pred]>]>,
    when: Box<[Pred]>,
}

impl CompiledRule {
    /// `from`, `to` and `when` are ANDed, so their order is free: sources (usually an
    /// exact principal) first, then operations, then conditions (header look-ups).
    fn eval(&self, f: &Facts<'_>) -> Tri {
        let mut r = any_entry(&self.from, f);
        if r != Tri::False {
            r = r.and(any_entry(&self.to, f));
        }
        if r != Tri::False {
            r = r.and(all(&self.when, f));
        }
        r
    }

    /// The index keys of this rule: for the rule to be true or unknown, the request
    /// must produce one of them. `None` when the rule cannot be narrowed so.
    ///
    /// Sources are preferred (every `from` entry needs a positive `principals` of exact,
    /// `prefix*` or `*suffix` values bounded by a `/`, or a positive `namespaces` of
    /// literal values or `serviceAccounts`), then `when` conditions on
    /// `source.principal`/`source.namespace`; otherwise operations (every `to` entry needs a positive `paths`
    /// of exact values, `prefix*` values or URI templates with a literal leading segment).
    /// Principals and namespaces are never unknown (no peer: false); paths are unknown
    /// on TCP connections, where every path-keyed rule is visited.
    fn index_keys(&self) -> Option<Vec<(Dim, &str)>> {
        self.source_keys()
            .or_else(|| peer_keys(&self.when))
            .or_else(|| self.operation_keys())
    }

    fn source_keys(&self) -> Option<Vec<(Dim, &str)>> {
        if self.from.is_empty() {
            return None;
        }
        let mut keys = Vec::new();
        for entry in self.from.iter() {
            keys.extend(peer_keys(entry)?);
        }
        Some(keys)
    }

    fn operation_keys(&self) -> Option<Vec<(Dim, &str)>> {
        if self.to.is_empty() {
            return None;
        }
        let mut keys = Vec::new();
        for entry in self.to.iter() {
            let entry_keys: Vec<(Dim, &str)> = entry.iter().find_map(|p| match &p.field {
                Field::Path(ps) if !p.negate => ps.iter().map(PathMatch::index_key).collect(),
                _ => None,
            })?;
            keys.extend(entry_keys);
        }
        Some(keys)
    }
}

/// Keys from the first of the ANDed `preds` that has them: a positive principal
/// predicate (exact, or `/`-bounded prefix or suffix values), else a positive literal
/// namespace or service account predicate.
fn peer_keys(preds: &[Pred]) -> Option<Vec<(Dim, &str)>> {
    let by_principal = preds.iter().find_map(|p| match &p.field {
        Field::Principal(ms) if !p.negate => ms.iter().map(principal_key).collect(),
        _ => None,
    });
    by_principal.or_else(|| {
        preds.iter().find_map(|p| match &p.field {
            Field::Namespace(gs) if !p.negate => gs
                .iter()
                .map(|g| match &*g.0 {
                    [literal] => Some((Dim::Namespace, &**literal)),
                    _ => None,
                })
                .collect(),
            // `serviceAccounts` compare the namespace of an Istio-form ID.
            Field::ServiceAccount(sas) if !p.negate => {
                Some(sas.iter().map(|(ns, _)| (Dim::Namespace, &**ns)).collect())
            }
            _ => None,
        })
    })
}

/// How many `/`-bounded prefixes (or suffixes) of a principal or path the index looks
/// up per request; longer keys are cut to this many `/`s at compilation.
const KEY_SLASHES: usize = 4;

/// The index a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dim {
    /// The whole principal.
    Principal,
    /// A principal prefix ending in `/`.
    PrincipalPrefix,
    /// A principal suffix starting with `/`.
    PrincipalSuffix,
    /// The peer's namespace.
    Namespace,
    /// The whole path.
    Path,
    /// A path prefix ending in `/`, with at least one segment.
    PathPrefix,
}

/// Byte offsets of the `/`s in `s`, first to last (a plain byte scan: keys and
/// principals are short, where `memchr` costs more than it saves).
fn slashes(s: &str) -> impl Iterator<Item = usize> + '_ {
    s.bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'/')
        .map(|(i, _)| i)
}

/// Byte offsets of the `/`s in `s`, last to first.
fn slashes_rev(s: &str) -> impl Iterator<Item = usize> + '_ {
    s.bytes()
        .enumerate()
        .rev()
        .filter(|&(_, b)| b == b'/')
        .map(|(i, _)| i)
}

/// `s` up to and including its `min(n, KEY_SLASHES)`-th `/` (of `n`); `None` with
/// fewer than `min` slashes. Every string starting with `s` starts with the key and
/// has the key as one of its first `KEY_SLASHES` `/`-bounded prefixes.
fn prefix_key(s: &str, min: usize) -> Option<&str> {
    let mut end = None;
    for (count, i) in slashes(s).take(KEY_SLASHES).enumerate() {
        if count + 1 >= min {
            end = Some(i);
        }
    }
    end.map(|i| &s[..=i])
}

/// `s` from its `min(n, KEY_SLASHES)`-th `/` counted from the end; `None` without `/`.
fn suffix_key(s: &str) -> Option<&str> {
    slashes_rev(s).take(KEY_SLASHES).last().map(|i| &s[i..])
}

fn principal_key(m: &StrMatch) -> Option<(Dim, &str)> {
    match m {
        StrMatch::Exact(e) => Some((Dim::Principal, &**e)),
        StrMatch::Prefix(p) => Some((Dim::PrincipalPrefix, prefix_key(p, 1)?)),
        StrMatch::Suffix(x) => Some((Dim::PrincipalSuffix, suffix_key(x)?)),
        StrMatch::Presence => None,
    }
}

impl PathMatch {
    fn index_key(&self) -> Option<(Dim, &str)> {
        match self {
            PathMatch::Str(StrMatch::Exact(e)) => Some((Dim::Path, &**e)),
            PathMatch::Str(StrMatch::Prefix(p)) => Some((Dim::PathPrefix, prefix_key(p, 2)?)),
            PathMatch::Str(_) => None,
            PathMatch::Template(_, prefix) => Some((Dim::PathPrefix, prefix_key(prefix, 2)?)),
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    name: Arc<str>,
    rules: Box<[CompiledRule]>,
}

/// `(policy, rule)` indices in declaration order.
type RuleRef = (u32, u32);

type Index = HashMap<Box<str>, Vec<RuleRef>, IndexHasher>;

/// At most this many candidate lists per decision: the whole principal, its prefixes
/// and suffixes, the namespace, the whole path and its prefixes, the unindexed rules.
const MAX_LISTS: usize = 3 * KEY_SLASHES + 4;

/// The policies of one action, with rules indexed by a key the request must produce for
/// the rule to apply (see [`CompiledRule::index_keys`]), so a decision evaluates only
/// the rules that can apply, still in declaration order.
#[derive(Clone, Debug, Default)]
struct ActionList {
    policies: Vec<CompiledPolicy>,
    principal: Index,
    principal_prefix: Index,
    principal_suffix: Index,
    namespace: Index,
    path: Index,
    path_prefix: Index,
    /// Every path-keyed rule: visited when the path is unknown (TCP connections).
    path_keyed: Vec<RuleRef>,
    unindexed: Vec<RuleRef>,
}

/// The sorted candidate lists of one decision, merged in declaration order.
struct Candidates<'a> {
    lists: [&'a [RuleRef]; MAX_LISTS],
    len: usize,
}

impl<'a> Candidates<'a> {
    fn add(&mut self, list: Option<&'a Vec<RuleRef>>) {
        if let Some(list) = list.filter(|l| !l.is_empty()) {
            // MAX_LISTS bounds the number of look-ups below.
            self.lists[self.len] = list;
            self.len += 1;
        }
    }
}

impl ActionList {
    fn push(&mut self, policy: CompiledPolicy) {
        let p = u32::try_from(self.policies.len()).unwrap_or(u32::MAX);
        for (r, rule) in policy.rules.iter().enumerate() {
            let at = (p, u32::try_from(r).unwrap_or(u32::MAX));
            let Some(keys) = rule.index_keys() else {
                self.unindexed.push(at);
                continue;
            };
            for (dim, key) in keys {
                let index = match dim {
                    Dim::Principal => &mut self.principal,
                    Dim::PrincipalPrefix => &mut self.principal_prefix,
                    Dim::PrincipalSuffix => &mut self.principal_suffix,
                    Dim::Namespace => &mut self.namespace,
                    Dim::Path => &mut self.path,
                    Dim::PathPrefix => &mut self.path_prefix,
                };
                let refs = index.entry(key.into()).or_default();
                if refs.last() != Some(&at) {
                    refs.push(at);
                }
                if matches!(dim, Dim::Path | Dim::PathPrefix) && self.path_keyed.last() != Some(&at)
                {
                    self.path_keyed.push(at);
                }
            }
        }
        self.policies.push(policy);
    }

    /// The lists of rules that can apply to the request.
    fn candidates<'s>(&'s self, f: &Facts<'_>) -> Candidates<'s> {
        let mut c = Candidates {
            lists: [&[]; MAX_LISTS],
            len: 0,
        };
        if let Some(p) = f.principal {
            if !self.principal.is_empty() {
                c.add(self.principal.get(p));
            }
            if !self.principal_prefix.is_empty() {
                for i in slashes(p).take(KEY_SLASHES) {
                    c.add(self.principal_prefix.get(&p[..=i]));
                }
            }
            if !self.principal_suffix.is_empty() {
                for i in slashes_rev(p).take(KEY_SLASHES) {
                    c.add(self.principal_suffix.get(&p[i..]));
                }
            }
            if !self.namespace.is_empty()
                && let Some(ns) = f.namespace()
            {
                c.add(self.namespace.get(ns));
            }
        }
        if !f.http {
            c.add(Some(&self.path_keyed));
        } else {
            let path = f.a.path;
            if !self.path.is_empty() {
                c.add(self.path.get(path));
            }
            if !self.path_prefix.is_empty() {
                for i in slashes(path).take(KEY_SLASHES).skip(1) {
                    c.add(self.path_prefix.get(&path[..=i]));
                }
            }
        }
        c.add(Some(&self.unindexed));
        c
    }

    /// The first rule, in declaration order, that matches. `unknown_matches`: DENY and
    /// AUDIT semantics.
    fn first_match(&self, f: &Facts<'_>, unknown_matches: bool) -> Option<MatchedPolicy> {
        if f.linear {
            return self.first_match_linear(f, unknown_matches);
        }
        if self.policies.is_empty() {
            return None;
        }
        let c = self.candidates(f);
        let lists = &c.lists[..c.len];
        match lists {
            [] => return None,
            [only] => {
                return only
                    .iter()
                    .find_map(|&at| self.try_rule(at, f, unknown_matches));
            }
            [a, b] => return self.first_match_of_two(a, b, f, unknown_matches),
            _ => {}
        }
        let mut pos = [0usize; MAX_LISTS];
        let mut last = None;
        loop {
            let mut best: Option<(usize, RuleRef)> = None;
            for (k, list) in lists.iter().enumerate() {
                if let Some(&at) = list.get(pos[k])
                    && best.is_none_or(|(_, b)| at < b)
                {
                    best = Some((k, at));
                }
            }
            let (k, at) = best?;
            pos[k] += 1;
            // A rule under several keys is visited once.
            if last == Some(at) {
                continue;
            }
            last = Some(at);
            if let Some(m) = self.try_rule(at, f, unknown_matches) {
                return Some(m);
            }
        }
    }

    /// The common case of two candidate lists (e.g. the peer's rules and the unindexed
    /// ones), merged in declaration order; a rule in both is visited once.
    fn first_match_of_two(
        &self,
        mut a: &[RuleRef],
        mut b: &[RuleRef],
        f: &Facts<'_>,
        unknown_matches: bool,
    ) -> Option<MatchedPolicy> {
        loop {
            let at = match (a.split_first(), b.split_first()) {
                (Some((&x, rest)), Some((&y, _))) if x < y => {
                    a = rest;
                    x
                }
                (Some((&x, rest_a)), Some((&y, rest_b))) if x == y => {
                    (a, b) = (rest_a, rest_b);
                    x
                }
                (_, Some((&y, rest))) => {
                    b = rest;
                    y
                }
                (Some((&x, rest)), None) => {
                    a = rest;
                    x
                }
                (None, None) => return None,
            };
            if let Some(m) = self.try_rule(at, f, unknown_matches) {
                return Some(m);
            }
        }
    }

    /// Every rule in declaration order, without the index (the reference the index is
    /// tested against).
    fn first_match_linear(&self, f: &Facts<'_>, unknown_matches: bool) -> Option<MatchedPolicy> {
        self.policies.iter().enumerate().find_map(|(p, policy)| {
            (0..policy.rules.len()).find_map(|r| {
                let at = (
                    u32::try_from(p).unwrap_or(u32::MAX),
                    u32::try_from(r).unwrap_or(u32::MAX),
                );
                self.try_rule(at, f, unknown_matches)
            })
        })
    }

    #[inline(always)]
    fn try_rule(&self, at: RuleRef, f: &Facts<'_>, unknown_matches: bool) -> Option<MatchedPolicy> {
        let policy = &self.policies[at.0 as usize];
        let matched = match policy.rules[at.1 as usize].eval(f) {
            Tri::True => true,
            Tri::Unknown => unknown_matches,
            Tri::False => false,
        };
        matched.then(|| MatchedPolicy {
            name: policy.name.clone(),
            rule: at.1 as usize,
        })
    }
}

#[derive(Clone, Debug, Default)]
struct Engine {
    deny: ActionList,
    audit: ActionList,
    allow: ActionList,
}

impl Engine {
    fn is_empty(&self) -> bool {
        self.deny.policies.is_empty()
            && self.audit.policies.is_empty()
            && self.allow.policies.is_empty()
    }

    fn len(&self) -> usize {
        self.deny.policies.len() + self.audit.policies.len() + self.allow.policies.len()
    }

    fn push(&mut self, action: Action, policy: CompiledPolicy) {
        match action {
            Action::Allow => self.allow.push(policy),
            Action::Deny => self.deny.push(policy),
            Action::Audit => self.audit.push(policy),
            // Rejected before compilation.
            Action::Custom => {}
        }
    }

    fn audit(&self, f: &Facts<'_>) -> Option<MatchedPolicy> {
        self.audit.first_match(f, true)
    }

    /// CUSTOM (none) → DENY → ALLOW (AP-02).
    fn decide(&self, f: &Facts<'_>) -> (bool, Option<MatchedPolicy>) {
        if let Some(m) = self.deny.first_match(f, true) {
            return (false, Some(m));
        }
        if self.allow.policies.is_empty() {
            return (true, None);
        }
        match self.allow.first_match(f, false) {
            Some(m) => (true, Some(m)),
            None => (false, None),
        }
    }
}

/// The compiled AuthorizationPolicies that apply to one workload.
///
/// Cheap to evaluate, immutable; swap a new one into an [`AuthzLayer`] on reload.
///
/// [`AuthzLayer`]: super::AuthzLayer
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    enforced: Engine,
    dry_run: Engine,
}

impl PolicySet {
    /// A set without policies: every request is allowed.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Validates and compiles `policies`, all of which apply (no scope filtering).
    ///
    /// Fails on the first invalid policy: an unsupported `CUSTOM` action, a DENY or
    /// AUDIT without rules, `from: []`/`to: []`, a source or operation without fields,
    /// an empty value, an invalid IP/CIDR, port or header name, a bad URI template,
    /// `serviceAccounts` combined with `principals`/`namespaces`, a condition without
    /// values or with an unknown key.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a Policy>,
    ) -> Result<Self, PolicyError> {
        Self::compile_with_domains(policies, &[])
    }

    fn compile_with_domains<'a>(
        policies: impl IntoIterator<Item = &'a Policy>,
        domains: &[String],
    ) -> Result<Self, PolicyError> {
        let mut set = Self::default();
        for policy in policies {
            let compiled = compile_policy(policy, domains)?;
            if policy.dry_run {
                set.dry_run.push(policy.action, compiled);
            } else {
                set.enforced.push(policy.action, compiled);
            }
        }
        Ok(set)
    }

    /// Compiles the policies of `policies` that apply to `workload` (see
    /// [`Workload::is_selected_by`]); the others are not validated. With
    /// [`Workload::trust_domain_aliases`], principals written in the workload's trust
    /// domain or an alias also match the same workload identity in the others (AP-24).
    pub fn for_workload<'a>(
        policies: impl IntoIterator<Item = &'a Policy>,
        workload: &Workload,
    ) -> Result<Self, PolicyError> {
        let domains: Vec<String> = if workload.trust_domain_aliases.is_empty() {
            Vec::new()
        } else {
            std::iter::once(workload.trust_domain.clone())
                .chain(workload.trust_domain_aliases.iter().cloned())
                .collect()
        };
        Self::compile_with_domains(
            policies.into_iter().filter(|p| workload.is_selected_by(p)),
            &domains,
        )
    }

    /// Number of enforced policies (dry-run ones excluded).
    pub fn len(&self) -> usize {
        self.enforced.len()
    }

    /// Whether no policy (enforced or dry-run) applies.
    pub fn is_empty(&self) -> bool {
        self.enforced.is_empty() && self.dry_run.is_empty()
    }

    /// Decides a request. Never allocates, except to join a repeated header that a
    /// `request.headers[...]` condition inspects.
    pub fn evaluate(&self, attrs: &RequestAttributes<'_>) -> AuthzDecision {
        self.decide_facts(&Facts::new(attrs, true))
    }

    /// Decides a TCP (non-HTTP) connection (AP-30): the HTTP-only attributes (`hosts`,
    /// `methods`, `paths`, `request.headers`, JWT attributes) are unknown, so an ALLOW
    /// rule never matches through them and a DENY rule applies as if they matched
    /// (a DENY with only `paths` denies every connection in its scope; scope DENY rules
    /// with `ports`).
    pub fn evaluate_connection(
        &self,
        peer: Option<&Identity>,
        connection: &ConnectionInfo,
        server_name: ServerName<'_>,
    ) -> AuthzDecision {
        self.decide_connection(peer, connection, server_name, false)
    }

    /// [`Self::evaluate`] without the rule index.
    #[cfg(test)]
    fn evaluate_linear(&self, attrs: &RequestAttributes<'_>) -> AuthzDecision {
        let mut facts = Facts::new(attrs, true);
        facts.linear = true;
        self.decide_facts(&facts)
    }

    fn decide_connection(
        &self,
        peer: Option<&Identity>,
        connection: &ConnectionInfo,
        server_name: ServerName<'_>,
        linear: bool,
    ) -> AuthzDecision {
        let headers = HeaderMap::new();
        let attrs = RequestAttributes {
            method: "",
            path: "",
            host: None,
            headers: &headers,
            peer,
            connection: Some(connection),
            remote_ip: None,
            server_name,
            request_auth: None,
        };
        let mut facts = Facts::new(&attrs, false);
        facts.linear = linear;
        self.decide_facts(&facts)
    }

    fn decide_facts(&self, facts: &Facts<'_>) -> AuthzDecision {
        let (allowed, policy) = self.enforced.decide(facts);
        let audit = self.enforced.audit(facts);
        let dry_run = if self.dry_run.is_empty() {
            None
        } else {
            let (allowed, policy) = self.dry_run.decide(facts);
            Some(DryRunDecision { allowed, policy })
        };
        AuthzDecision {
            allowed,
            policy,
            audit,
            dry_run,
        }
    }
}

struct Ctx<'p> {
    policy: &'p Policy,
    name: String,
    /// The local trust domain followed by its aliases; empty without aliases.
    domains: &'p [String],
}

impl Ctx<'_> {
    /// `values` plus, for every principal in the local trust domain or one of its
    /// aliases, the same principal in each of the others (AP-24). Added after the
    /// originals so error indices keep naming the written values.
    fn with_aliases<'v>(&self, values: &'v [String]) -> std::borrow::Cow<'v, [String]> {
        if self.domains.is_empty() {
            return std::borrow::Cow::Borrowed(values);
        }
        let mut out = values.to_vec();
        for v in values {
            let Some((td, rest)) = v.split_once('/') else {
                continue;
            };
            if !rest.starts_with("ns/") || !self.domains.iter().any(|d| d == td) {
                continue;
            }
            for d in self.domains.iter().filter(|d| *d != td) {
                out.push(format!("{d}/{rest}"));
            }
        }
        std::borrow::Cow::Owned(out)
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            policy: self.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn compile_policy(policy: &Policy, domains: &[String]) -> Result<CompiledPolicy, PolicyError> {
    let cx = Ctx {
        policy,
        name: policy.full_name(),
        domains,
    };
    let rules: &[Rule] = policy.rules.as_deref().unwrap_or(&[]);
    match policy.action {
        Action::Custom => {
            return Err(cx.err(
                "action",
                "CUSTOM (ext-authz) is not supported by this proxy; use ALLOW, DENY or AUDIT",
            ));
        }
        Action::Deny | Action::Audit if rules.is_empty() => {
            return Err(cx.err(
                "rules",
                format!(
                    "a {} policy needs at least one rule; add an empty rule `{{}}` to match every request",
                    policy.action.as_istio()
                ),
            ));
        }
        _ => {}
    }
    let mut compiled = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        compiled.push(compile_rule(&cx, rule, &format!("rules[{i}]"))?);
    }
    Ok(CompiledPolicy {
        name: cx.name.clone().into(),
        rules: compiled.into(),
    })
}

fn compile_rule(cx: &Ctx<'_>, rule: &Rule, at: &str) -> Result<CompiledRule, PolicyError> {
    let from = match &rule.from {
        None => Vec::new(),
        Some(v) if v.is_empty() => {
            return Err(cx.err(
                format!("{at}.from"),
                "`from` must not be empty; omit it to match any source",
            ));
        }
        Some(v) => v
            .iter()
            .enumerate()
            .map(|(i, s)| compile_source(cx, s, &format!("{at}.from[{i}].source")))
            .collect::<Result<_, _>>()?,
    };
    let to = match &rule.to {
        None => Vec::new(),
        Some(v) if v.is_empty() => {
            return Err(cx.err(
                format!("{at}.to"),
                "`to` must not be empty; omit it to match any operation",
            ));
        }
        Some(v) => v
            .iter()
            .enumerate()
            .map(|(i, o)| compile_operation(cx, o, &format!("{at}.to[{i}].operation")))
            .collect::<Result<_, _>>()?,
    };
    let mut when = Vec::new();
    for (i, c) in rule.when.iter().enumerate() {
        compile_condition(cx, c, &format!("{at}.when[{i}]"), &mut when)?;
    }
    when.sort_by_key(|p| p.field.cost());
    Ok(CompiledRule {
        from: from.into(),
        to: to.into(),
        when: when.into(),
    })
}

fn values<T>(
    cx: &Ctx<'_>,
    at: &str,
    vals: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Box<[T]>, PolicyError> {
    vals.iter()
        .enumerate()
        .map(|(i, v)| {
            if v.is_empty() {
                return Err(cx.err(format!("{at}[{i}]"), "empty values are not allowed"));
            }
            parse(v).map_err(|m| cx.err(format!("{at}[{i}]"), m))
        })
        .collect()
}

fn str_match(v: &str) -> Result<StrMatch, String> {
    Ok(StrMatch::parse(v))
}

fn ip_net(v: &str) -> Result<Cidr, String> {
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(Cidr::new(IpNet::from(canonical_ip(ip))));
    }
    match v.parse::<IpNet>() {
        Ok(net) => Ok(Cidr::new(net.trunc())),
        Err(_) => Err(format!("`{v}` is not an IP address or CIDR range")),
    }
}

fn port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .map_err(|_| format!("`{v}` is not a port number (0-65535)"))
}

fn host(v: &str) -> Result<StrMatch, String> {
    Ok(StrMatch::parse(&v.to_ascii_lowercase()))
}

struct PredBuilder<'c, 'p> {
    cx: &'c Ctx<'p>,
    at: &'c str,
    preds: Vec<Pred>,
}

impl PredBuilder<'_, '_> {
    fn add<T>(
        &mut self,
        name: &str,
        vals: &[String],
        negate: bool,
        parse: impl Fn(&str) -> Result<T, String>,
        field: impl FnOnce(Box<[T]>) -> Field,
    ) -> Result<(), PolicyError> {
        if vals.is_empty() {
            return Ok(());
        }
        let parsed = values(self.cx, &format!("{}.{name}", self.at), vals, parse)?;
        self.preds.push(Pred {
            field: field(parsed),
            negate,
        });
        Ok(())
    }
}

/// A `requestPrincipals` value as issuer and subject matchers (RA-09, Istio's
/// `requestPrincipalGenerator`): split at the last `/`; `*` is a non-empty issuer and
/// subject; `*x/sub` a suffix of the issuer (`*/sub` any issuer) with an exact subject;
/// `iss/x*` an exact issuer with a subject prefix (`iss/*` any subject); without a `/`,
/// `*x` is a subject suffix with any issuer and `x*` an issuer prefix with any subject.
fn request_principal(v: &str) -> Result<(StrMatch, StrMatch), String> {
    let any = || StrMatch::Presence;
    let split = v.rfind('/').map(|i| (&v[..i], &v[i + 1..]));
    Ok(if v == "*" {
        (any(), any())
    } else if let Some(rest) = v.strip_prefix('*') {
        match split {
            Some(("*", sub)) => (any(), StrMatch::Exact(sub.into())),
            Some((iss, sub)) => (
                StrMatch::Suffix(iss[1..].into()),
                StrMatch::Exact(sub.into()),
            ),
            None => (any(), StrMatch::Suffix(rest.into())),
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        match split {
            Some((iss, "*")) => (StrMatch::Exact(iss.into()), any()),
            Some((iss, sub)) => (
                StrMatch::Exact(iss.into()),
                StrMatch::Prefix(sub[..sub.len() - 1].into()),
            ),
            None => (StrMatch::Prefix(rest.into()), any()),
        }
    } else {
        match split {
            Some((iss, sub)) => (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into())),
            None => (StrMatch::Exact(v.into()), StrMatch::Exact("".into())),
        }
    })
}

fn compile_source(cx: &Ctx<'_>, s: &Source, at: &str) -> Result<Box<[Pred]>, PolicyError> {
    if (!s.service_accounts.is_empty() || !s.not_service_accounts.is_empty())
        && (!s.principals.is_empty()
            || !s.not_principals.is_empty()
            || !s.namespaces.is_empty()
            || !s.not_namespaces.is_empty())
    {
        return Err(cx.err(
            at,
            "`serviceAccounts` cannot be combined with `principals` or `namespaces`",
        ));
    }
    let policy_ns = cx.policy.namespace.clone();
    let service_account = move |v: &str| -> Result<(Box<str>, Box<str>), String> {
        if v.contains('*') {
            return Err(format!("service account `{v}`: wildcards are not allowed"));
        }
        let (ns, sa) = match v.split_once('/') {
            Some((ns, sa)) => (ns, sa),
            None => (policy_ns.as_str(), v),
        };
        if ns.is_empty() || sa.is_empty() || sa.contains('/') {
            return Err(format!(
                "service account `{v}` must be `<namespace>/<name>` or `<name>`"
            ));
        }
        Ok((ns.into(), sa.into()))
    };
    for list in [&s.service_accounts, &s.not_service_accounts] {
        if list.len() > 16 {
            return Err(cx.err(at, "at most 16 `serviceAccounts` are allowed"));
        }
    }
    let mut b = PredBuilder {
        cx,
        at,
        preds: Vec::new(),
    };
    add_pair(
        &mut b,
        "principals",
        &cx.with_aliases(&s.principals),
        &cx.with_aliases(&s.not_principals),
        str_match,
        Field::Principal,
    )?;
    add_pair(
        &mut b,
        "requestPrincipals",
        &s.request_principals,
        &s.not_request_principals,
        request_principal,
        Field::RequestPrincipal,
    )?;
    add_pair(
        &mut b,
        "namespaces",
        &s.namespaces,
        &s.not_namespaces,
        |v| Ok(Glob::parse(v)),
        Field::Namespace,
    )?;
    add_pair(
        &mut b,
        "serviceAccounts",
        &s.service_accounts,
        &s.not_service_accounts,
        service_account,
        Field::ServiceAccount,
    )?;
    add_pair(
        &mut b,
        "trustDomains",
        &s.trust_domains,
        &s.not_trust_domains,
        str_match,
        Field::TrustDomain,
    )?;
    add_pair(
        &mut b,
        "ipBlocks",
        &s.ip_blocks,
        &s.not_ip_blocks,
        ip_net,
        Field::SourceIp,
    )?;
    add_pair(
        &mut b,
        "remoteIpBlocks",
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        ip_net,
        Field::RemoteIp,
    )?;
    if b.preds.is_empty() {
        return Err(cx.err(at, "a source must set at least one field"));
    }
    b.preds.sort_by_key(|p| p.field.cost());
    Ok(b.preds.into())
}

/// Adds `field` (positive) and `notField` (negated) predicates.
fn add_pair<T>(
    b: &mut PredBuilder<'_, '_>,
    name: &str,
    vals: &[String],
    not_vals: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
    field: impl Fn(Box<[T]>) -> Field,
) -> Result<(), PolicyError> {
    b.add(name, vals, false, &parse, &field)?;
    let mut not_name = String::from("not");
    let mut chars = name.chars();
    if let Some(c) = chars.next() {
        not_name.push(c.to_ascii_uppercase());
        not_name.push_str(chars.as_str());
    }
    b.add(&not_name, not_vals, true, &parse, &field)
}

fn compile_operation(cx: &Ctx<'_>, o: &Operation, at: &str) -> Result<Box<[Pred]>, PolicyError> {
    let mut b = PredBuilder {
        cx,
        at,
        preds: Vec::new(),
    };
    add_pair(&mut b, "hosts", &o.hosts, &o.not_hosts, host, Field::Host)?;
    add_pair(&mut b, "ports", &o.ports, &o.not_ports, port, Field::Port)?;
    add_pair(
        &mut b,
        "methods",
        &o.methods,
        &o.not_methods,
        str_match,
        Field::Method,
    )?;
    add_pair(
        &mut b,
        "paths",
        &o.paths,
        &o.not_paths,
        PathMatch::parse,
        Field::Path,
    )?;
    if b.preds.is_empty() {
        return Err(cx.err(at, "an operation must set at least one field"));
    }
    b.preds.sort_by_key(|p| p.field.cost());
    Ok(b.preds.into())
}

/// The names of `[a][b]...` (RA-10).
fn claim_path(mut rest: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('[')
            .ok_or("claims are written `[name]`, nested claims `[outer][inner]`")?;
        let end = inner.find(']').ok_or("a `[` is not closed")?;
        if end == 0 {
            return Err("claim names must not be empty".into());
        }
        names.push(&inner[..end]);
        rest = &inner[end + 1..];
    }
    if names.is_empty() {
        return Err("a claim name is required, e.g. `request.auth.claims[groups]`".into());
    }
    Ok(names)
}

fn compile_condition(
    cx: &Ctx<'_>,
    c: &Condition,
    at: &str,
    out: &mut Vec<Pred>,
) -> Result<(), PolicyError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(cx.err(
            at,
            format!("condition `{}` needs `values` or `notValues`", c.key),
        ));
    }
    let key = c.key.as_str();
    let mut b = PredBuilder {
        cx,
        at,
        preds: Vec::new(),
    };
    let (v, nv) = (&c.values, &c.not_values);
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            cx.err(
                format!("{at}.key"),
                format!("`{name}` is not a valid header name"),
            )
        })?;
        add_pair(&mut b, "values", v, nv, str_match, move |m| {
            Field::Header(header.clone(), m)
        })?;
    } else if let Some(rest) = key.strip_prefix("request.auth.claims") {
        let path: Box<[Box<str>]> = claim_path(rest)
            .map_err(|m| cx.err(format!("{at}.key"), format!("`{key}`: {m}")))?
            .into_iter()
            .map(Into::into)
            .collect();
        add_pair(&mut b, "values", v, nv, str_match, move |m| {
            Field::Claim(path.clone(), m)
        })?;
    } else if key.starts_with("request.auth.") {
        match key {
            "request.auth.principal" => {
                add_pair(&mut b, "values", v, nv, str_match, Field::AuthPrincipal)?;
            }
            "request.auth.audiences" | "request.auth.presenter" => {
                let claim: Box<str> = if key.ends_with("audiences") {
                    "aud"
                } else {
                    "azp"
                }
                .into();
                add_pair(&mut b, "values", v, nv, str_match, move |m| {
                    Field::Claim(Box::new([claim.clone()]), m)
                })?;
            }
            _ => {
                return Err(cx.err(
                    format!("{at}.key"),
                    format!(
                        "unsupported condition key `{key}`; the JWT attributes are request.auth.principal, \
                         request.auth.audiences, request.auth.presenter and request.auth.claims[<name>]"
                    ),
                ));
            }
        }
    } else {
        match key {
            "source.ip" => add_pair(&mut b, "values", v, nv, ip_net, Field::SourceIp)?,
            "remote.ip" => add_pair(&mut b, "values", v, nv, ip_net, Field::RemoteIp)?,
            "destination.ip" => add_pair(&mut b, "values", v, nv, ip_net, Field::DestinationIp)?,
            "destination.port" => add_pair(&mut b, "values", v, nv, port, Field::Port)?,
            "source.principal" => add_pair(
                &mut b,
                "values",
                &cx.with_aliases(v),
                &cx.with_aliases(nv),
                str_match,
                Field::Principal,
            )?,
            "source.namespace" => add_pair(
                &mut b,
                "values",
                v,
                nv,
                |s| Ok(Glob::parse(s)),
                Field::Namespace,
            )?,
            "connection.sni" => add_pair(&mut b, "values", v, nv, host, Field::Sni)?,
            _ => {
                return Err(cx.err(
                    format!("{at}.key"),
                    format!(
                        "unsupported condition key `{key}`; supported: request.headers[<name>], source.ip, remote.ip, \
                         source.namespace, source.principal, destination.ip, destination.port, connection.sni, request.auth.*"
                    ),
                ));
            }
        }
    }
    out.extend(b.preds);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        let m = StrMatch::parse;
        assert!(m("abc").matches("abc") && !m("abc").matches("abcd"));
        assert!(m("abc*").matches("abc") && m("abc*").matches("abcd") && !m("abc*").matches("ab"));
        assert!(
            m("*abc").matches("abc") && m("*abc").matches("xabc") && !m("*abc").matches("abcx")
        );
        assert!(m("*").matches("x") && !m("*").matches(""));
        assert!(m("a*c").matches("a*c") && !m("a*c").matches("abc"));
        assert!(m("cert-manager.io").matches("cert-manager.io"));
        assert!(!m("cert-manager.io").matches("cert-manager-io"));
        assert!(m("secret.com").matches_ignore_case("Secret.COM"));
        assert!(m("*.com").matches_ignore_case("A.COM"));
    }

    #[test]
    fn globs_and_templates() {
        let g = Glob::parse;
        assert!(g("prod").matches("prod") && !g("prod").matches("prod1"));
        assert!(g("prod*").matches("prod-eu") && g("*-eu").matches("prod-eu"));
        assert!(g("p*-*u").matches("prod-eu") && !g("p*-*x").matches("prod-eu"));
        let t = |p: &str| PathMatch::parse(p).unwrap();
        assert!(t("/foo/{*}").matches("/foo/bar") && !t("/foo/{*}").matches("/foo/bar/baz"));
        assert!(!t("/foo/{*}").matches("/foo/") && !t("/foo/{*}").matches("/foo"));
        assert!(t("/foo/{**}").matches("/foo/bar/baz") && t("/foo/{**}").matches("/foo/"));
        assert!(!t("/foo/{**}").matches("/foo") && !t("/foo/{**}").matches("/foobar"));
        assert!(t("/{*}/x/{**}").matches("/a/x/b/c") && !t("/{*}/x/{**}").matches("/a/y/b"));
        assert!(t("/admin/{*}").matches("/admin/*x"));
        assert!(PathMatch::parse("/foo/{**}/bar").is_err());
        assert!(PathMatch::parse("/foo{*}").is_err());
    }

    #[test]
    fn bare_host_strips_port_and_trailing_dot() {
        assert_eq!(bare_host("a.com:80"), "a.com");
        assert_eq!(bare_host("a.com."), "a.com");
        assert_eq!(bare_host("[::1]:8080"), "[::1]");
        assert_eq!(bare_host("::1"), "::1");
    }

    #[test]
    fn kleene_logic() {
        use Tri::*;
        assert_eq!(Unknown.and(False), False);
        assert_eq!(Unknown.and(True), Unknown);
        assert_eq!(Unknown.or(True), True);
        assert_eq!(Unknown.or(False), Unknown);
        assert_eq!(Unknown.not(), Unknown);
    }

    #[test]
    fn cidrs_contain_the_addresses_of_their_range_and_family_only() {
        let c = |v: &str| ip_net(v).unwrap();
        let ip = |v: &str| v.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("10.1.2.3/8").contains(ip("10.9.9.9")));
        assert!(c("10.1.2.3").contains(ip("10.1.2.3")) && !c("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(c("0.0.0.0/0").contains(ip("1.2.3.4")) && !c("0.0.0.0/0").contains(ip("::1")));
        assert!(c("fd00::/8").contains(ip("fd12::1")) && !c("fd00::/8").contains(ip("fe00::1")));
        assert!(!c("::/0").contains(ip("1.2.3.4")));
        assert!(c("::ffff:10.0.0.1").contains(ip("10.0.0.1")));
        assert_eq!(
            ip_in(&[c("10.0.0.0/8")], Some(ip("::ffff:10.0.0.7"))),
            Tri::True
        );
    }

    #[test]
    fn index_keys_are_slash_bounded_and_capped() {
        assert_eq!(
            prefix_key("cluster.local/ns/a/", 1),
            Some("cluster.local/ns/a/")
        );
        assert_eq!(
            prefix_key("cluster.local/ns/a", 1),
            Some("cluster.local/ns/")
        );
        assert_eq!(prefix_key("td/ns/a/sa/b/c/", 1), Some("td/ns/a/sa/"));
        assert_eq!(prefix_key("cluster", 1), None);
        assert_eq!(prefix_key("/admin", 2), None);
        assert_eq!(
            prefix_key("/api/v1/payments/", 2),
            Some("/api/v1/payments/")
        );
        assert_eq!(suffix_key("/sa/order"), Some("/sa/order"));
        assert_eq!(suffix_key(".local/ns/a/sa/b/c"), Some("/a/sa/b/c"));
        assert_eq!(suffix_key(".local"), None);
        let prefix = |t: &str| match PathMatch::parse(t).unwrap() {
            PathMatch::Template(_, p) => p,
            PathMatch::Str(_) => panic!("not a template"),
        };
        assert_eq!(&*prefix("/api/v1/{*}/x"), "/api/v1/");
        assert_eq!(&*prefix("/a/{**}"), "/a/");
        assert_eq!(&*prefix("/{*}/x"), "");
    }

    #[test]
    fn path_keyed_deny_applies_to_every_tcp_connection() {
        let deny = Policy::new(
            "ns",
            "deny-admin",
            Action::Deny,
            vec![Rule {
                from: None,
                to: Some(vec![Operation {
                    paths: vec!["/admin/*".into()],
                    ..Operation::default()
                }]),
                when: vec![],
            }],
        );
        let set = PolicySet::compile([&deny]).unwrap();
        assert_eq!(set.enforced.deny.path_keyed.len(), 1);
        assert!(set.enforced.deny.unindexed.is_empty());
        let info = ConnectionInfo {
            remote: "10.0.0.1:1000".parse().unwrap(),
            local: "10.0.0.2:80".parse().unwrap(),
            security: mesh_core::ConnectionSecurity::None,
        };
        let d = set.evaluate_connection(None, &info, ServerName::Unknown);
        assert!(!d.allowed);
        assert_eq!(d.policy.unwrap().name.as_ref(), "ns/deny-admin");
    }

    mod index_vs_linear {
        use super::*;
        use proptest::prelude::*;

        const PRINCIPALS: &[&str] = &[
            "cluster.local/ns/a/sa/x",
            "cluster.local/ns/b/sa/y",
            "cluster.local/ns/a/*",
            "cluster.local/ns/a/sa/x/deep/er/more/*",
            "cluster.local/*",
            "cluster*",
            "*/sa/x",
            "*.local/ns/a/sa/x",
            "*/er/more/z",
            "*",
            "other.td/ns/a/sa/x",
        ];
        const NAMESPACES: &[&str] = &["a", "b", "a*", "*"];
        const PATHS: &[&str] = &[
            "/api/v1/x",
            "/api/*",
            "/api/v1/*",
            "/api/{*}/x",
            "/{*}/x",
            "/api/v1/payments/deep/more/*",
            "/a/b/c/d/e",
            "/a/b/c/d/e/*",
            "/a/{**}",
            "*x",
            "/ap*",
            "*",
        ];
        const PEERS: &[&str] = &[
            "spiffe://cluster.local/ns/a/sa/x",
            "spiffe://cluster.local/ns/b/sa/y",
            "spiffe://other.td/ns/a/sa/x",
            "spiffe://cluster.local/ns/a/sa/x/deep/er/more/z",
            "spiffe://cluster.local/workload/x",
        ];
        const REQUEST_PATHS: &[&str] = &[
            "/api/v1/x",
            "/api/v2/x",
            "/api/v1/payments/deep/more/z",
            "/a/b/c/d/e",
            "/a/b/c/d/e/f",
            "/a/",
            "/",
            "/apx",
            "/api/",
            "*",
        ];

        fn pick(vocab: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
            prop::collection::vec(prop::sample::select(vocab), 0..3)
                .prop_map(|v| v.into_iter().map(String::from).collect())
        }

        fn source() -> impl Strategy<Value = Source> {
            (
                pick(PRINCIPALS),
                pick(PRINCIPALS),
                pick(NAMESPACES),
                pick(NAMESPACES),
                prop::sample::select(&["", "10.0.0.0/8", "192.168.0.0/16"][..]),
                any::<bool>(),
                pick(&["a/x", "b/y", "x"]),
            )
                .prop_map(
                    |(principals, not_principals, namespaces, not_namespaces, ip, jwt, sas)| {
                        let mut s = Source {
                            principals,
                            not_principals,
                            namespaces,
                            not_namespaces,
                            ..Source::default()
                        };
                        // `serviceAccounts` cannot be combined with principals or namespaces.
                        if s == Source::default() {
                            s.service_accounts = sas;
                        }
                        if !ip.is_empty() {
                            s.ip_blocks = vec![ip.into()];
                        }
                        if jwt {
                            s.not_request_principals = vec!["*".into()];
                        }
                        s
                    },
                )
        }

        fn operation() -> impl Strategy<Value = Operation> {
            (
                pick(PATHS),
                pick(PATHS),
                pick(&["GET", "POST"]),
                pick(&["80", "8080"]),
                pick(&["*.svc", "payment"]),
            )
                .prop_map(|(paths, not_paths, methods, ports, hosts)| Operation {
                    paths,
                    not_paths,
                    methods,
                    ports,
                    hosts,
                    ..Operation::default()
                })
        }

        fn rule() -> impl Strategy<Value = Rule> {
            (
                prop::option::of(prop::collection::vec(source(), 1..3)),
                prop::option::of(prop::collection::vec(operation(), 1..3)),
                prop::option::of(prop::sample::select(&["acme", "glob*"][..])),
                prop::option::of((
                    prop::sample::select(
                        &[
                            ("source.namespace", "a"),
                            ("source.namespace", "b*"),
                            ("source.principal", "cluster.local/ns/a/*"),
                            ("source.principal", "*/sa/y"),
                            ("source.principal", "cluster.local/ns/b/sa/y"),
                        ][..],
                    ),
                    any::<bool>(),
                )),
            )
                .prop_map(|(from, to, header, peer)| {
                    let mut when: Vec<Condition> = header
                        .map(|v| vec![Condition::values("request.headers[x-t]", &[v])])
                        .unwrap_or_default();
                    if let Some(((key, value), negate)) = peer {
                        when.push(if negate {
                            Condition::not_values(key, &[value])
                        } else {
                            Condition::values(key, &[value])
                        });
                    }
                    Rule { from, to, when }
                })
        }

        fn policies() -> impl Strategy<Value = Vec<Policy>> {
            prop::collection::vec(
                (
                    prop::sample::select(&[Action::Allow, Action::Deny, Action::Audit][..]),
                    prop::collection::vec(rule(), 1..5),
                    any::<bool>(),
                ),
                1..8,
            )
            .prop_map(|ps| {
                ps.into_iter()
                    .enumerate()
                    .map(|(i, (action, rules, dry_run))| {
                        let mut p = Policy::new("ns", &format!("p{i}"), action, rules);
                        p.dry_run = dry_run;
                        p
                    })
                    .collect()
            })
        }

        /// Keeps the sources and operations that have a field (the others fail
        /// compilation and would reject the whole set).
        fn valid(mut ps: Vec<Policy>) -> Vec<Policy> {
            for p in &mut ps {
                for r in p.rules.iter_mut().flatten() {
                    if let Some(from) = &mut r.from {
                        from.retain(|s| *s != Source::default());
                        if from.is_empty() {
                            r.from = None;
                        }
                    }
                    if let Some(to) = &mut r.to {
                        to.retain(|o| *o != Operation::default());
                        if to.is_empty() {
                            r.to = None;
                        }
                    }
                }
            }
            ps
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            #[test]
            fn indexed_and_linear_evaluation_decide_identically(
                ps in policies(),
                peer in prop::option::of(prop::sample::select(PEERS)),
                path in prop::sample::select(REQUEST_PATHS),
                method in prop::sample::select(&["GET", "POST"][..]),
                port in prop::sample::select(&[80u16, 8080][..]),
                tenant in prop::sample::select(&["acme", "global", ""][..]),
                connection in any::<bool>(),
            ) {
                let ps = valid(ps);
                let set = PolicySet::compile(&ps).unwrap();
                let peer = peer.map(|p| Identity::parse(p).unwrap());
                let info = ConnectionInfo {
                    remote: "10.1.2.3:4000".parse().unwrap(),
                    local: std::net::SocketAddr::from(([10, 9, 9, 9], port)),
                    security: mesh_core::ConnectionSecurity::MutualTls,
                };
                let mut headers = HeaderMap::new();
                if !tenant.is_empty() {
                    headers.insert("x-t", http::HeaderValue::from_static(tenant));
                }
                let attrs = RequestAttributes {
                    method,
                    path,
                    host: Some("payment.ns.svc"),
                    headers: &headers,
                    peer: peer.as_ref(),
                    connection: connection.then_some(&info),
                    remote_ip: None,
                    server_name: ServerName::Unknown,
                    request_auth: None,
                };
                prop_assert_eq!(set.evaluate(&attrs), set.evaluate_linear(&attrs));
                prop_assert_eq!(
                    set.decide_connection(peer.as_ref(), &info, ServerName::Unknown, false),
                    set.decide_connection(peer.as_ref(), &info, ServerName::Unknown, true)
                );
            }
        }
    }
}
