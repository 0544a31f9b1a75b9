//! DNS for ServiceEntries with `resolution: DNS` or `DNS_ROUND_ROBIN`: names resolved
//! by a real stub resolver (hickory), with the answer's TTL telling when to ask again.
//!
//! The resolver reads the system's configuration (`/etc/resolv.conf`), or asks the name
//! servers it is given. Answers are cached for their TTL, so a refresh before the TTL
//! runs out sends no query.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// A DNS stub resolver; cheap to clone.
#[derive(Clone)]
pub struct DnsResolver {
    /// `None`: no configuration could be read; every lookup fails.
    inner: Option<Arc<TokioResolver>>,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

/// A resolver that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct DnsError(#[from] NetError);

impl DnsResolver {
    /// The system's resolver configuration (name servers, search domains, options).
    pub fn system() -> Result<Self, DnsError> {
        Ok(Self {
            inner: Some(Arc::new(TokioResolver::builder_tokio()?.build()?)),
        })
    }

    /// The system's resolver, or, when its configuration cannot be read, a resolver
    /// whose every lookup fails (logged once here).
    pub fn system_or_none() -> Self {
        Self::system().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no DNS configuration; DNS names will not resolve");
            Self { inner: None }
        })
    }

    /// Asks the name servers at `servers` (UDP, then TCP for truncated answers), with no
    /// search domains: names are looked up as written.
    pub fn with_servers(servers: &[SocketAddr]) -> Result<Self, DnsError> {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let config = ResolverConfig::from_name_servers(name_servers);
        let builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        Ok(Self {
            inner: Some(Arc::new(builder.build()?)),
        })
    }

    /// The addresses `name` resolves to, in the answer's order, and how long the answer
    /// stays valid (its TTL).
    pub async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), NetError> {
        let Some(inner) = &self.inner else {
            return Err(NetError::from("no DNS configuration"));
        };
        let answer = inner.lookup_ip(name).await?;
        let ttl = answer
            .valid_until()
            .saturating_duration_since(tokio::time::Instant::now().into_std());
        Ok((answer.iter().collect(), ttl))
    }
}
