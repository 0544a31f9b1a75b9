//! `mesh-proxy init`: the capture rules in the current network namespace (the job of
//! Istio's `istio-iptables` in the `istio-init` container; see
//! [`mesh_proxy::capture`]). Flags take Istio's annotation names, with
//! `istio-iptables`' short options.

use std::process::ExitCode;

use mesh_proxy::capture::iptables::{self, Family, Jumps};
use mesh_proxy::capture::{self, Backend, Rules, Selection, parse_ports, parse_ranges};

/// Arguments of `init`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Port outbound TCP is redirected to.
    #[arg(short = 'p', long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port inbound TCP is redirected to.
    #[arg(short = 'z', long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// UID of the proxy, whose traffic is never captured.
    #[arg(short = 'u', long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID of the proxy, whose traffic is never captured.
    #[arg(short = 'g', long, default_value_t = 1337)]
    pub proxy_gid: u32,
    /// Outbound destinations captured: CIDRs, comma-separated, or `*`
    /// (`traffic.sidecar.istio.io/includeOutboundIPRanges`).
    #[arg(short = 'i', long, default_value = "*")]
    pub include_outbound_ip_ranges: String,
    /// Outbound destinations never captured (`excludeOutboundIPRanges`).
    #[arg(short = 'x', long, default_value = "")]
    pub exclude_outbound_ip_ranges: String,
    /// Outbound destination ports never captured (`excludeOutboundPorts`).
    #[arg(short = 'o', long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Outbound destination ports always captured, whatever the address
    /// (`includeOutboundPorts`).
    #[arg(short = 'q', long, default_value = "")]
    pub include_outbound_ports: String,
    /// Inbound ports captured, or `*`; empty captures no inbound traffic
    /// (`includeInboundPorts`).
    #[arg(short = 'b', long, default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured, besides the proxy's own 15000, 15020, 15021, 15090
    /// (`excludeInboundPorts`).
    #[arg(short = 'd', long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// The rule language: `nft`, or `iptables` (`iptables-restore`) where nftables is
    /// missing; `auto` takes `nft` when it runs.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Print the script instead of applying it (for `iptables`, the two
    /// `iptables-restore --noflush` scripts as a first run writes them).
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules (the whole `inet mesh_capture` table) instead.
    #[arg(long)]
    pub cleanup: bool,
}

fn only<T>(s: Selection<T>) -> Vec<T> {
    match s {
        Selection::All => Vec::new(),
        Selection::Only(v) => v,
    }
}

impl Args {
    /// The rules these arguments describe.
    pub fn rules(&self) -> Result<Rules, capture::ParseError> {
        Ok(Rules {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            include_outbound_ip_ranges: parse_ranges(
                "includeOutboundIPRanges",
                &self.include_outbound_ip_ranges,
            )?,
            exclude_outbound_ip_ranges: only(parse_ranges(
                "excludeOutboundIPRanges",
                &self.exclude_outbound_ip_ranges,
            )?),
            exclude_outbound_ports: only(parse_ports(
                "excludeOutboundPorts",
                &self.exclude_outbound_ports,
            )?),
            include_outbound_ports: only(parse_ports(
                "includeOutboundPorts",
                &self.include_outbound_ports,
            )?),
            include_inbound_ports: parse_ports("includeInboundPorts", &self.include_inbound_ports)?,
            exclude_inbound_ports: only(parse_ports(
                "excludeInboundPorts",
                &self.exclude_inbound_ports,
            )?),
        })
    }
}

/// Runs the subcommand.
pub fn run(args: &Args) -> ExitCode {
    let rules = if args.cleanup {
        None
    } else {
        match args.rules() {
            Ok(rules) => Some(rules),
            Err(e) => {
                eprintln!("mesh-proxy init: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let backend = args.backend.resolve();
    if args.dry_run {
        match (&rules, backend) {
            (None, Backend::Iptables) => println!(
                "# iptables and ip6tables: delete the jumps to and the chains {} and {}",
                iptables::INBOUND_CHAIN,
                iptables::OUTPUT_CHAIN
            ),
            (None, _) => print!("{}", capture::cleanup_ruleset()),
            (Some(rules), Backend::Iptables) => {
                for family in Family::ALL {
                    println!("# {family:?}: iptables-restore --noflush");
                    print!("{}", rules.iptables_script(family, Jumps::default()));
                }
            }
            (Some(rules), _) => print!("{}", rules.ruleset()),
        }
        return ExitCode::SUCCESS;
    }
    let applied = match (&rules, backend) {
        (None, Backend::Iptables) => iptables::cleanup(),
        (None, _) => capture::apply(&capture::cleanup_ruleset()),
        (Some(rules), Backend::Iptables) => iptables::apply(rules),
        (Some(rules), _) => capture::apply(&rules.ruleset()),
    };
    match applied {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}
