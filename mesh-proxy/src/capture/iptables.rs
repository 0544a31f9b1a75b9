//! The same rules for hosts without `nft`: `iptables-restore`/`ip6tables-restore`
//! scripts (iptables-nft on current distributions, legacy iptables on old ones), one
//! per address family, with two chains of our own in the `nat` table:
//!
//! ```text
//! PREROUTING -p tcp -j MESH_INBOUND     OUTPUT -p tcp -j MESH_OUTPUT
//! ```
//!
//! holding the rules of [`Rules::ruleset`](super::Rules::ruleset), in the same order.
//!
//! A run restores with `--noflush`: declaring the two chains creates or empties them, so
//! their rules are replaced in one transaction per family; the two jumps are added only
//! when [`jumps_present`] says they are missing, so running `init` again never doubles
//! them. Clean-up deletes the jumps and the chains, and is harmless when there are none.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::{ApplyError, HBONE_PORT, PROXY_PORTS, Rules, Selection, pipe};

/// The chain `PREROUTING` jumps to for TCP.
pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
/// The chain `OUTPUT` jumps to for TCP.
pub const OUTPUT_CHAIN: &str = "MESH_OUTPUT";

/// An address family's tools and loopback addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// Both, in the order they are applied.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The address the inbound passthrough connects to the application from.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// Which of the two jumps into our chains exist already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Jumps {
    /// `PREROUTING -p tcp -j MESH_INBOUND`.
    pub prerouting: bool,
    /// `OUTPUT -p tcp -j MESH_OUTPUT`.
    pub output: bool,
}

impl Rules {
    /// The `iptables-restore --noflush` script of these rules for `family`, adding the
    /// jumps that `present` says are missing.
    pub fn iptables_script(&self, family: Family, present: Jumps) -> String {
        let mut s = String::from("*nat\n");
        let _ = writeln!(s, ":{INBOUND_CHAIN} - [0:0]");
        let _ = writeln!(s, ":{OUTPUT_CHAIN} - [0:0]");
        if !present.prerouting {
            let _ = writeln!(s, "-A PREROUTING -p tcp -j {INBOUND_CHAIN}");
        }
        if !present.output {
            let _ = writeln!(s, "-A OUTPUT -p tcp -j {OUTPUT_CHAIN}");
        }
        self.iptables_inbound(&mut s);
        self.iptables_outbound(&mut s, family);
        s.push_str("COMMIT\n");
        s
    }

    fn iptables_inbound(&self, s: &mut String) {
        let chain = INBOUND_CHAIN;
        let redirect = format!("-j REDIRECT --to-ports {}", self.inbound_port);
        let _ = writeln!(s, "-A {chain} -p tcp --dport {HBONE_PORT} -j RETURN");
        match &self.include_inbound_ports {
            Selection::All => {
                let mut excluded: Vec<u16> = PROXY_PORTS.to_vec();
                excluded.extend(&self.exclude_inbound_ports);
                excluded.sort_unstable();
                excluded.dedup();
                for port in excluded {
                    let _ = writeln!(s, "-A {chain} -p tcp --dport {port} -j RETURN");
                }
                let _ = writeln!(s, "-A {chain} -p tcp {redirect}");
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
                for port in ports {
                    let _ = writeln!(s, "-A {chain} -p tcp --dport {port} {redirect}");
                }
            }
        }
    }

    fn iptables_outbound(&self, s: &mut String, family: Family) {
        let chain = OUTPUT_CHAIN;
        let mut ports = self.exclude_outbound_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        for port in ports {
            let _ = writeln!(s, "-A {chain} -p tcp --dport {port} -j RETURN");
        }
        let _ = writeln!(
            s,
            "-A {chain} -o lo -s {} -j RETURN",
            family.passthrough_source()
        );
        let loopback = family.loopback();
        let in_redirect = format!("-j REDIRECT --to-ports {}", self.inbound_port);
        for (owner, id) in [
            ("--uid-owner", self.proxy_uid),
            ("--gid-owner", self.proxy_gid),
        ] {
            // The proxy calling its own pod's address goes through the inbound side.
            let _ = writeln!(
                s,
                "-A {chain} -o lo ! -d {loopback} -p tcp ! --dport {HBONE_PORT} -m owner {owner} {id} {in_redirect}"
            );
            let _ = writeln!(s, "-A {chain} -o lo -m owner ! {owner} {id} -j RETURN");
            let _ = writeln!(s, "-A {chain} -m owner {owner} {id} -j RETURN");
        }
        let _ = writeln!(s, "-A {chain} -d {loopback} -j RETURN");
        let redirect = format!("-j REDIRECT --to-ports {}", self.outbound_port);
        let mut included = self.include_outbound_ports.clone();
        included.sort_unstable();
        included.dedup();
        for port in included {
            let _ = writeln!(s, "-A {chain} -p tcp --dport {port} {redirect}");
        }
        for net in self
            .exclude_outbound_ip_ranges
            .iter()
            .filter(|n| family.holds(n))
        {
            let _ = writeln!(s, "-A {chain} -d {net} -j RETURN");
        }
        match &self.include_outbound_ip_ranges {
            Selection::All => {
                let _ = writeln!(s, "-A {chain} -p tcp {redirect}");
            }
            Selection::Only(ranges) => {
                for net in ranges.iter().filter(|n| family.holds(n)) {
                    let _ = writeln!(s, "-A {chain} -d {net} -p tcp {redirect}");
                }
            }
        }
    }
}

/// Whether `family`'s jumps into our chains exist (`iptables -t nat -C`).
pub fn jumps_present(family: Family) -> Jumps {
    let check = |hook: &str, chain: &str| {
        Command::new(family.tool())
            .args(["-w", "-t", "nat", "-C", hook, "-p", "tcp", "-j", chain])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    Jumps {
        prerouting: check("PREROUTING", INBOUND_CHAIN),
        output: check("OUTPUT", OUTPUT_CHAIN),
    }
}

/// Applies `rules` with `iptables-restore` and `ip6tables-restore --noflush`.
pub fn apply(rules: &Rules) -> Result<(), ApplyError> {
    for family in Family::ALL {
        let script = rules.iptables_script(family, jumps_present(family));
        pipe(family.restore(), &["-w", "--noflush"], &script)?;
    }
    Ok(())
}

/// Removes the jumps and the chains of both families, whether or not they exist.
pub fn cleanup() -> Result<(), ApplyError> {
    for family in Family::ALL {
        let run = |args: &[&str]| {
            Command::new(family.tool())
                .args(["-w", "-t", "nat"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|source| ApplyError::Spawn {
                    tool: family.tool(),
                    source,
                })
        };
        for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)] {
            // One deletion per copy; a copy left by hand goes too.
            while run(&["-D", hook, "-p", "tcp", "-j", chain])?.success() {}
        }
        for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
            if run(&["-F", chain])?.success() {
                run(&["-X", chain])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{parse_ports, parse_ranges};

    #[test]
    fn default_rules_mirror_the_nftables_order() {
        let rules = Rules::default();
        let v4 = rules.iptables_script(Family::V4, Jumps::default());
        let expected = "*nat
:MESH_INBOUND - [0:0]
:MESH_OUTPUT - [0:0]
-A PREROUTING -p tcp -j MESH_INBOUND
-A OUTPUT -p tcp -j MESH_OUTPUT
-A MESH_INBOUND -p tcp --dport 15008 -j RETURN
-A MESH_INBOUND -p tcp --dport 15000 -j RETURN
-A MESH_INBOUND -p tcp --dport 15020 -j RETURN
-A MESH_INBOUND -p tcp --dport 15021 -j RETURN
-A MESH_INBOUND -p tcp --dport 15090 -j RETURN
-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A MESH_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j REDIRECT --to-ports 15006
-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j REDIRECT --to-ports 15006
-A MESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A MESH_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(v4, expected);
        let v6 = rules.iptables_script(
            Family::V6,
            Jumps {
                prerouting: true,
                output: true,
            },
        );
        assert!(
            !v6.contains("-A PREROUTING") && !v6.contains("-A OUTPUT"),
            "{v6}"
        );
        assert!(
            v6.contains("-A MESH_OUTPUT -o lo -s ::6/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(v6.contains("-A MESH_OUTPUT -d ::1/128 -j RETURN\n"), "{v6}");
    }

    #[test]
    fn ranges_go_to_their_family() {
        let only = |s: Selection<IpNet>| match s {
            Selection::Only(v) => v,
            Selection::All => Vec::new(),
        };
        let rules = Rules {
            include_outbound_ip_ranges: parse_ranges("i", "10.96.0.0/12,fd00:96::/64").unwrap(),
            exclude_outbound_ip_ranges: only(
                parse_ranges("x", "10.96.5.0/24,fd00:96::5/128").unwrap(),
            ),
            include_outbound_ports: vec![6379],
            include_inbound_ports: parse_ports("b", "8080,15021").unwrap(),
            ..Rules::default()
        };
        let v4 = rules.iptables_script(Family::V4, Jumps::default());
        let v6 = rules.iptables_script(Family::V6, Jumps::default());
        assert!(
            v4.contains("-A MESH_OUTPUT -d 10.96.5.0/24 -j RETURN\n"),
            "{v4}"
        );
        assert!(
            v4.contains("-A MESH_OUTPUT -d 10.96.0.0/12 -p tcp -j REDIRECT --to-ports 15001\n")
        );
        assert!(!v4.contains("fd00"), "{v4}");
        assert!(
            v6.contains("-A MESH_OUTPUT -d fd00:96::5/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(!v6.contains("10.96"), "{v6}");
        // Included ports come before the address exclusions; only listed inbound ports.
        let port = v4.find("--dport 6379 -j REDIRECT").unwrap();
        assert!(port < v4.find("10.96.5.0/24").unwrap());
        assert!(v4.contains("-A MESH_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006\n"));
        assert!(!v4.contains("--dport 15021 -j REDIRECT"), "{v4}");
    }
}
