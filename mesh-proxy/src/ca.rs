//! `mesh-proxy ca`: the development certificate authority on the command line.
//!
//! - `ca init --trust-domain cluster.local --out DIR` creates a root CA and writes
//!   `ca-cert.pem`, `ca-key.pem` (mode 0600) and `root-cert.pem`.
//! - `ca issue --ca DIR --namespace NS --service-account SA [--ttl 24h] [--dns NAME]
//!   --out DIR` issues a workload SVID for `spiffe://<td>/ns/NS/sa/SA` and writes
//!   Istio's `cert-chain.pem`, `key.pem`, `root-cert.pem`.
//! - `ca rotate --ca DIR --dir DIR [--ttl D]` replaces the SVID in `DIR` at once with a
//!   new key and certificate for the same identity (a compromised workload). A proxy
//!   watching `DIR` serves the new certificate to new handshakes; existing connections
//!   stay up.
//!
//! Files are written through a temporary file and a rename, so a watching proxy never
//! reads half a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use mesh_tls::CertificateAuthority;
use mesh_tls::ca::{CA_KEY_FILE, DEFAULT_WORKLOAD_TTL};
use mesh_tls::svid::{CERT_CHAIN_FILE, PeerRole, check_leaf_with, read_certs};

/// Development certificate authority: create a root, issue and rotate workload SVIDs.
#[derive(Parser, Debug)]
pub struct CaCommand {
    #[command(subcommand)]
    command: CaSubcommand,
}

#[derive(Subcommand, Debug)]
enum CaSubcommand {
    /// Create a root CA for a trust domain.
    Init {
        /// The SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Directory for ca-cert.pem, ca-key.pem and root-cert.pem.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing CA key in the directory.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload SVID (cert-chain.pem, key.pem, root-cert.pem).
    Issue {
        /// Directory of the CA (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// Kubernetes namespace of the workload.
        #[arg(long)]
        namespace: String,
        /// Service account of the workload.
        #[arg(long)]
        service_account: String,
        /// Lifetime, e.g. 24h, 90m, 1h30m, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
        /// Extra DNS SAN (for non-mesh clients such as curl); repeatable.
        #[arg(long)]
        dns: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replace the SVID in a directory now: new key, new certificate, same identity.
    Rotate {
        /// Directory of the CA (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// Directory holding the SVID to replace.
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of the new certificate (default: that of the current one).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Extra DNS SAN; repeatable.
        #[arg(long)]
        dns: Vec<String>,
    },
}

/// Runs a `ca` subcommand, printing what it did or why it failed.
pub fn run(cmd: CaCommand) -> ExitCode {
    match execute(cmd.command) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

fn execute(cmd: CaSubcommand) -> Result<String, Error> {
    match cmd {
        CaSubcommand::Init {
            trust_domain,
            out,
            force,
        } => {
            if !force && out.join(CA_KEY_FILE).exists() {
                return Err(format!(
                    "{} already exists; pass --force to replace the CA",
                    out.join(CA_KEY_FILE).display()
                )
                .into());
            }
            let ca = CertificateAuthority::new(&trust_domain)?;
            ca.write_dir(&out)?;
            Ok(format!(
                "created a root CA for trust domain {trust_domain} in {}",
                out.display()
            ))
        }
        CaSubcommand::Issue {
            ca,
            namespace,
            service_account,
            ttl,
            dns,
            out,
        } => issue(&ca, &namespace, &service_account, ttl, &dns, &out),
        CaSubcommand::Rotate { ca, dir, ttl, dns } => {
            let chain = read_certs(&dir.join(CERT_CHAIN_FILE))?;
            let current = check_leaf_with(&chain[0], PeerRole::Server, |_| true, None)?;
            let identity = current.identity;
            let (Some(namespace), Some(service_account)) =
                (identity.namespace(), identity.service_account())
            else {
                return Err(format!("{identity} is not an Istio workload identity").into());
            };
            let ttl = ttl.unwrap_or_else(|| {
                current
                    .not_after
                    .duration_since(current.not_before)
                    .unwrap_or(DEFAULT_WORKLOAD_TTL)
            });
            let message = issue(&ca, namespace, service_account, ttl, &dns, &dir)?;
            Ok(format!(
                "rotated (old serial {}): {message}",
                current.serial
            ))
        }
    }
}

fn issue(
    ca_dir: &Path,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
    dns: &[String],
    out: &Path,
) -> Result<String, Error> {
    let ca = CertificateAuthority::load_dir(ca_dir)?;
    let mut spec = ca.workload_spec(namespace, service_account, ttl)?;
    for name in dns {
        spec = spec.with_dns(name);
    }
    let svid = ca.issue_with(&spec)?;
    svid.write_dir(out)?;
    let expires = svid
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(format!(
        "issued {} serial {} valid for {}s (until unix {expires}) in {}",
        svid.identity(),
        svid.serial(),
        ttl.as_secs(),
        out.display()
    ))
}

/// Parses a lifetime such as `24h`, `90m`, `1h30m`, `45s` or `7d`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut saw_unit = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("unknown unit {c:?} in {s:?}; use s, m, h or d")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("missing number before {c:?} in {s:?}"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        digits.clear();
        saw_unit = true;
    }
    if !digits.is_empty() || !saw_unit {
        return Err(format!("{s:?} needs a unit (s, m, h or d), e.g. 24h"));
    }
    if total == 0 {
        return Err("the lifetime must be positive".into());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_tls::svid::SvidFiles;

    fn run_args(args: &[&str]) -> Result<String, Error> {
        let mut argv = vec!["ca"];
        argv.extend_from_slice(args);
        execute(CaCommand::try_parse_from(argv)?.command)
    }

    #[test]
    fn ttl_accepts_go_like_durations() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_ttl("24").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("3w").is_err());
    }

    #[test]
    fn init_issue_rotate_round_trip() {
        let ca_dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let ca = ca_dir.path().to_str().unwrap();
        let svid_dir = out.path().to_str().unwrap();

        run_args(&["init", "--trust-domain", "cluster.local", "--out", ca]).unwrap();
        let again = run_args(&["init", "--out", ca]).unwrap_err();
        assert!(again.to_string().contains("--force"), "{again}");

        let msg = run_args(&[
            "issue",
            "--ca",
            ca,
            "--namespace",
            "production",
            "--service-account",
            "order-service",
            "--ttl",
            "2h",
            "--out",
            svid_dir,
        ])
        .unwrap();
        assert!(
            msg.contains("spiffe://cluster.local/ns/production/sa/order-service"),
            "{msg}"
        );
        let before = SvidFiles::load_dir(out.path()).unwrap();
        let store = mesh_tls::CertStore::new(before).unwrap();
        let leaf = store.current().leaf.clone();
        assert_eq!(
            leaf.not_after.duration_since(leaf.not_before).unwrap(),
            Duration::from_secs(7200)
        );

        let msg = run_args(&["rotate", "--ca", ca, "--dir", svid_dir]).unwrap();
        assert!(msg.contains(&leaf.serial.to_string()), "{msg}");
        let after = SvidFiles::load_dir(out.path()).unwrap();
        let rotated = store.install(after).unwrap();
        assert_ne!(rotated, leaf.serial);
        assert_eq!(store.identity(), leaf.identity);
        let new = store.current().leaf.clone();
        assert_eq!(
            new.not_after.duration_since(new.not_before).unwrap(),
            Duration::from_secs(7200),
            "rotation keeps the lifetime"
        );
    }

    #[test]
    fn issue_rejects_bad_names() {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = ca_dir.path().to_str().unwrap();
        run_args(&["init", "--out", ca]).unwrap();
        let err = run_args(&[
            "issue",
            "--ca",
            ca,
            "--namespace",
            "a/b",
            "--service-account",
            "x",
            "--out",
            ca,
        ])
        .unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
    }
}
