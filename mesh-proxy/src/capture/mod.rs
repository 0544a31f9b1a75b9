//! Transparent capture (feature `proxy`): the kernel rules that send a pod's TCP
//! traffic through its sidecar ([`Rules`], `mesh-proxy init`, the job of Istio's
//! `istio-iptables` init container), the original destination of a redirected
//! connection ([`original_destination`]), and the services that own virtual addresses
//! ([`Addresses`]).
//!
//! # The rules
//!
//! One nftables table, `inet mesh_capture`, for IPv4 and IPv6 at once, with Istio's
//! REDIRECT-mode chains (ISTIO.md TC-02 to TC-06) under nftables names:
//!
//! ```text
//! prerouting (nat, dstnat) -- TCP --> inbound:
//!   port 15008 return; proxy ports (15000, 15020, 15021, 15090) and excludeInboundPorts
//!   return; includeInboundPorts (or all TCP for `*`) redirect to :15006
//! output (nat, -100) -- TCP --> outbound:
//!   excludeOutboundPorts return; from 127.0.0.6 / ::6 on lo return (inbound passthrough);
//!   proxy UID to a non-loopback address on lo (not 15008) redirect to :15006 (the proxy
//!   calling its own pod address goes through inbound); other lo traffic of other UIDs
//!   return; proxy UID return; the same two for the proxy GID; to 127.0.0.1 / ::1 return;
//!   excludeOutboundIPRanges return; includeOutboundIPRanges (or all for `*`) redirect
//!   to :15001
//! ```
//!
//! Traffic of UID 1337 (the proxy) leaves uncaptured, which is what keeps the sidecar's
//! own connections from looping back into it. Only TCP is captured.
//!
//! # Choices
//!
//! - nftables text applied with `nft -f -`: the tool every current distribution ships,
//!   one transaction per run. A run first declares and deletes the table and then writes
//!   it whole, in the same transaction, so running `init` again replaces the rules
//!   atomically (never a moment without them, never two copies), and `--cleanup` deletes
//!   the table whether or not it exists.
//! - Where `nft` is missing, the same rules in the same order go through
//!   `iptables-restore` and `ip6tables-restore` ([`iptables`]; iptables-nft on current
//!   distributions), with chains `MESH_INBOUND` and `MESH_OUTPUT` in the `nat` table:
//!   [`Backend::Auto`] picks `nft` when it runs, and `--backend` chooses either.
//! - Port 15000 (the admin server) is excluded from inbound capture with the other proxy
//!   ports; Istio leaves it out of the list because its admin server listens on
//!   localhost only, which this exclusion makes explicit.
//! - `*` in `includeInboundPorts` captures every inbound TCP port; an empty list
//!   captures none (Istio's annotation semantics); `includeOutboundIPRanges` empty
//!   captures no outbound traffic.
//! - DNS capture (TC-05) and TPROXY mode are not offered.

mod addresses;
pub mod iptables;
mod original;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

pub use addresses::{Addresses, Owner};
use ipnet::IpNet;
pub use original::original_destination;

/// The nftables table the rules live in (family `inet`).
pub const TABLE: &str = "mesh_capture";

/// The proxy's own ports that inbound capture always leaves alone: admin (15000), status
/// (15020), health (15021), Prometheus (15090).
pub const PROXY_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

/// Istio's HBONE port, never captured (TC-03, TC-04).
const HBONE_PORT: u16 = 15008;

/// A list that is either everything (`*`) or these items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T> {
    /// `*`.
    All,
    /// These (possibly none).
    Only(Vec<T>),
}

impl<T> Selection<T> {
    fn is_empty(&self) -> bool {
        matches!(self, Selection::Only(v) if v.is_empty())
    }
}

/// What to capture (the arguments of `istio-iptables` as Istio's injector renders them
/// from the pod's `traffic.sidecar.istio.io/*` annotations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Where outbound TCP is redirected (`-p`, 15001).
    pub outbound_port: u16,
    /// Where inbound TCP is redirected (`-z`, 15006).
    pub inbound_port: u16,
    /// The proxy's UID, whose traffic is never captured (`-u`, 1337).
    pub proxy_uid: u32,
    /// The proxy's GID, likewise (`-g`, 1337).
    pub proxy_gid: u32,
    /// `includeOutboundIPRanges` (`-i`, default `*`).
    pub include_outbound_ip_ranges: Selection<IpNet>,
    /// `excludeOutboundIPRanges` (`-x`).
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// `excludeOutboundPorts` (`-o`).
    pub exclude_outbound_ports: Vec<u16>,
    /// `includeOutboundPorts` (`-q`): captured whatever the destination address, unless
    /// it is loopback or the proxy's own traffic.
    pub include_outbound_ports: Vec<u16>,
    /// `includeInboundPorts` (`-b`, default `*`).
    pub include_inbound_ports: Selection<u16>,
    /// `excludeInboundPorts` (`-d`, besides [`PROXY_PORTS`]).
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            include_outbound_ip_ranges: Selection::All,
            exclude_outbound_ip_ranges: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_ports: Vec::new(),
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
        }
    }
}

/// A malformed list.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {value:?} {problem}")]
pub struct ParseError {
    /// The option.
    pub what: &'static str,
    /// The offending item.
    pub value: String,
    /// What is wrong.
    pub problem: &'static str,
}

/// Parses a comma-separated list of CIDRs (a bare address is one host), or `*`.
pub fn parse_ranges(what: &'static str, text: &str) -> Result<Selection<IpNet>, ParseError> {
    parse_list(what, text, |item| {
        item.parse::<IpNet>()
            .map(|n| n.trunc())
            .ok()
            .or_else(|| item.parse::<IpAddr>().ok().map(IpNet::from))
            .ok_or("is not an IP range (CIDR)")
    })
}

/// Parses a comma-separated list of ports (1-65535), or `*`.
pub fn parse_ports(what: &'static str, text: &str) -> Result<Selection<u16>, ParseError> {
    parse_list(what, text, |item| match item.parse::<u16>() {
        Ok(0) | Err(_) => Err("is not a port (1-65535)"),
        Ok(p) => Ok(p),
    })
}

fn parse_list<T>(
    what: &'static str,
    text: &str,
    item: impl Fn(&str) -> Result<T, &'static str>,
) -> Result<Selection<T>, ParseError> {
    let items: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.contains(&"*") {
        return Ok(Selection::All);
    }
    items
        .into_iter()
        .map(|s| {
            item(s).map_err(|problem| ParseError {
                what,
                value: s.to_owned(),
                problem,
            })
        })
        .collect::<Result<Vec<T>, _>>()
        .map(Selection::Only)
}

/// `{ a, b }` of nftables, or the single item.
fn set<T: std::fmt::Display>(items: &[T]) -> String {
    match items {
        [one] => one.to_string(),
        many => {
            let joined: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("{{ {} }}", joined.join(", "))
        }
    }
}

impl Rules {
    /// The nftables script that replaces the table with these rules (see the module
    /// docs), for `nft -f -`.
    pub fn ruleset(&self) -> String {
        let mut s = String::new();
        // Declaring the table first makes the delete succeed when it does not exist yet;
        // both and the new table are one transaction.
        let _ = writeln!(s, "table inet {TABLE}");
        let _ = writeln!(s, "delete table inet {TABLE}");
        let _ = writeln!(s, "table inet {TABLE} {{");
        self.inbound(&mut s);
        self.outbound(&mut s);
        s.push_str("}\n");
        s
    }

    fn inbound(&self, s: &mut String) {
        s.push_str(
            "\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
        );
        s.push_str("\t\tmeta l4proto tcp jump inbound\n\t}\n");
        s.push_str("\tchain inbound {\n");
        let _ = writeln!(s, "\t\ttcp dport {HBONE_PORT} return");
        let redirect = format!("redirect to :{}", self.inbound_port);
        match &self.include_inbound_ports {
            Selection::All => {
                let mut excluded: Vec<u16> = PROXY_PORTS.to_vec();
                excluded.extend(&self.exclude_inbound_ports);
                excluded.sort_unstable();
                excluded.dedup();
                let _ = writeln!(s, "\t\ttcp dport {} return", set(&excluded));
                let _ = writeln!(s, "\t\tmeta l4proto tcp {redirect}");
            }
            Selection::Only(ports) => {
                let mut ports: Vec<u16> = ports
                    .iter()
                    .copied()
                    .filter(|p| !PROXY_PORTS.contains(p) && *p != HBONE_PORT)
                    .filter(|p| !self.exclude_inbound_ports.contains(p))
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                if !ports.is_empty() {
                    let _ = writeln!(s, "\t\ttcp dport {} {redirect}", set(&ports));
                }
            }
        }
        s.push_str("\t}\n");
    }

    fn outbound(&self, s: &mut String) {
        s.push_str("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n");
        s.push_str("\t\tmeta l4proto tcp jump outbound\n\t}\n");
        s.push_str("\tchain outbound {\n");
        let mut ports = self.exclude_outbound_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if !ports.is_empty() {
            let _ = writeln!(s, "\t\ttcp dport {} return", set(&ports));
        }
        // Connections of the inbound passthrough to the application.
        s.push_str("\t\toifname \"lo\" ip saddr 127.0.0.6 return\n");
        s.push_str("\t\toifname \"lo\" ip6 saddr ::6 return\n");
        let in_redirect = format!("redirect to :{}", self.inbound_port);
        for (owner, id) in [("skuid", self.proxy_uid), ("skgid", self.proxy_gid)] {
            // The proxy calling its own pod's address goes through the inbound side.
            let _ = writeln!(
                s,
                "\t\toifname \"lo\" meta {owner} {id} ip daddr != 127.0.0.1 tcp dport != {HBONE_PORT} {in_redirect}"
            );
            let _ = writeln!(
                s,
                "\t\toifname \"lo\" meta {owner} {id} ip6 daddr != ::1 tcp dport != {HBONE_PORT} {in_redirect}"
            );
            let _ = writeln!(s, "\t\toifname \"lo\" meta {owner} != {id} return");
            let _ = writeln!(s, "\t\tmeta {owner} {id} return");
        }
        s.push_str("\t\tip daddr 127.0.0.1 return\n\t\tip6 daddr ::1 return\n");
        let redirect = format!("redirect to :{}", self.outbound_port);
        let mut included = self.include_outbound_ports.clone();
        included.sort_unstable();
        included.dedup();
        if !included.is_empty() {
            // Before the address exclusions, as istio-iptables orders them.
            let _ = writeln!(s, "\t\ttcp dport {} {redirect}", set(&included));
        }
        let (v4, v6) = split(&self.exclude_outbound_ip_ranges);
        if !v4.is_empty() {
            let _ = writeln!(s, "\t\tip daddr {} return", set(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(s, "\t\tip6 daddr {} return", set(&v6));
        }
        match &self.include_outbound_ip_ranges {
            Selection::All => {
                let _ = writeln!(s, "\t\tmeta l4proto tcp {redirect}");
            }
            Selection::Only(ranges) => {
                let (v4, v6) = split(ranges);
                if !v4.is_empty() {
                    let _ = writeln!(s, "\t\tip daddr {} meta l4proto tcp {redirect}", set(&v4));
                }
                if !v6.is_empty() {
                    let _ = writeln!(s, "\t\tip6 daddr {} meta l4proto tcp {redirect}", set(&v6));
                }
            }
        }
        s.push_str("\t}\n");
    }

    /// Whether these rules capture nothing at all.
    pub fn captures_nothing(&self) -> bool {
        self.include_inbound_ports.is_empty()
            && self.include_outbound_ip_ranges.is_empty()
            && self.include_outbound_ports.is_empty()
    }
}

fn split(ranges: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    ranges.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// The script that removes the table (whether or not it exists).
pub fn cleanup_ruleset() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Why applying the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The tool could not be run.
    #[error(
        "cannot run `{tool}` (capture needs nftables' `nft`, or iptables' `iptables-restore`): {source}"
    )]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The tool refused the script.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// The tool.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

/// Which rule language writes the kernel's tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `nft` when it runs here, else iptables.
    #[default]
    Auto,
    /// `nft -f -` (table `inet mesh_capture`).
    Nft,
    /// `iptables-restore` and `ip6tables-restore` (chains `MESH_INBOUND`,
    /// `MESH_OUTPUT`).
    Iptables,
}

impl Backend {
    /// `Auto` made concrete: `Nft` when `nft --version` runs, else `Iptables`.
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto => {
                let nft = Command::new("nft")
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if nft { Backend::Nft } else { Backend::Iptables }
            }
            concrete => concrete,
        }
    }
}

/// Runs `tool args...` with `script` on its standard input.
fn pipe(tool: &'static str, args: &[&str], script: &str) -> Result<(), ApplyError> {
    let spawn = |source| ApplyError::Spawn { tool, source };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApplyError::Failed {
            tool,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `nft -f -` with `script` in the current network namespace.
pub fn apply(script: &str) -> Result<(), ApplyError> {
    pipe("nft", &["-f", "-"], script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_istio_annotations_do() {
        assert_eq!(parse_ports("p", "*").unwrap(), Selection::All);
        assert_eq!(parse_ports("p", "").unwrap(), Selection::Only(vec![]));
        assert_eq!(
            parse_ports("p", " 80, 8080 ").unwrap(),
            Selection::Only(vec![80, 8080])
        );
        let e = parse_ports("excludeInboundPorts", "80,http").unwrap_err();
        assert_eq!(
            e.to_string(),
            "excludeInboundPorts: \"http\" is not a port (1-65535)"
        );
        assert!(parse_ports("p", "0").is_err());
        assert_eq!(
            parse_ranges("r", "10.0.0.0/8,fd00::1/64,192.168.1.7").unwrap(),
            Selection::Only(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
                "192.168.1.7/32".parse().unwrap()
            ])
        );
        assert!(parse_ranges("r", "10.0.0.0/33").is_err());
    }

    #[test]
    fn default_rules_follow_istio_order() {
        let r = Rules::default().ruleset();
        let expected = "table inet mesh_capture
delete table inet mesh_capture
table inet mesh_capture {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tmeta l4proto tcp jump inbound
\t}
\tchain inbound {
\t\ttcp dport 15008 return
\t\ttcp dport { 15000, 15020, 15021, 15090 } return
\t\tmeta l4proto tcp redirect to :15006
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp jump outbound
\t}
\tchain outbound {
\t\toifname \"lo\" ip saddr 127.0.0.6 return
\t\toifname \"lo\" ip6 saddr ::6 return
\t\toifname \"lo\" meta skuid 1337 ip daddr != 127.0.0.1 tcp dport != 15008 redirect to :15006
\t\toifname \"lo\" meta skuid 1337 ip6 daddr != ::1 tcp dport != 15008 redirect to :15006
\t\toifname \"lo\" meta skuid != 1337 return
\t\tmeta skuid 1337 return
\t\toifname \"lo\" meta skgid 1337 ip daddr != 127.0.0.1 tcp dport != 15008 redirect to :15006
\t\toifname \"lo\" meta skgid 1337 ip6 daddr != ::1 tcp dport != 15008 redirect to :15006
\t\toifname \"lo\" meta skgid != 1337 return
\t\tmeta skgid 1337 return
\t\tip daddr 127.0.0.1 return
\t\tip6 daddr ::1 return
\t\tmeta l4proto tcp redirect to :15001
\t}
}
";
        assert_eq!(r, expected);
    }

    #[test]
    fn knobs_become_returns_and_restricted_redirects() {
        let rules = Rules {
            include_outbound_ip_ranges: parse_ranges("i", "10.96.0.0/12,fd00:96::/64").unwrap(),
            exclude_outbound_ip_ranges: parse_ranges("x", "10.96.5.0/24")
                .map(|s| match s {
                    Selection::Only(v) => v,
                    Selection::All => vec![],
                })
                .unwrap(),
            exclude_outbound_ports: vec![9000, 5432],
            include_outbound_ports: vec![6379],
            include_inbound_ports: Selection::Only(vec![8080, 15021, 9090]),
            exclude_inbound_ports: vec![9090],
            ..Rules::default()
        };
        let r = rules.ruleset();
        assert!(r.contains("\t\ttcp dport { 5432, 9000 } return\n"), "{r}");
        assert!(r.contains("\t\tip daddr 10.96.5.0/24 return\n"), "{r}");
        assert!(
            r.contains("\t\tip daddr 10.96.0.0/12 meta l4proto tcp redirect to :15001\n"),
            "{r}"
        );
        assert!(
            r.contains("\t\tip6 daddr fd00:96::/64 meta l4proto tcp redirect to :15001\n"),
            "{r}"
        );
        // Only the listed inbound ports, never the proxy's own or excluded ones.
        assert!(r.contains("\t\ttcp dport 8080 redirect to :15006\n"), "{r}");
        assert!(!r.contains("meta l4proto tcp redirect to :15006"), "{r}");
        // Exclusions come before the redirect; included ports before the exclusions.
        assert!(r.find("10.96.5.0/24").unwrap() < r.find("10.96.0.0/12").unwrap());
        let included = r.find("\t\ttcp dport 6379 redirect to :15001\n").unwrap();
        assert!(included < r.find("10.96.5.0/24").unwrap(), "{r}");
        let none = Rules {
            include_outbound_ip_ranges: Selection::Only(vec![]),
            include_inbound_ports: Selection::Only(vec![]),
            ..Rules::default()
        };
        assert!(none.captures_nothing());
        assert!(!none.ruleset().contains("redirect to :15001\n"));
    }
}
