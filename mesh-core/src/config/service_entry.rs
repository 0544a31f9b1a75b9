//! `ServiceEntry` (`networking.istio.io`): services added to the mesh's registry, with
//! inline `endpoints` (WorkloadEntry). Field names follow istio/api `service_entry.proto`.

use serde::Deserialize;
use std::collections::BTreeMap;

use super::{GatewayPort, Labels};

/// The `spec` of a ServiceEntry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServiceEntrySpec {
    /// Hosts of the service (required).
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDRs of the service.
    pub addresses: Vec<String>,
    /// Ports of the service.
    pub ports: Vec<GatewayPort>,
    /// Inside or outside the mesh.
    pub location: Option<Location>,
    /// How endpoints are discovered.
    pub resolution: Option<Resolution>,
    /// Inline endpoints.
    pub endpoints: Vec<WorkloadEntry>,
    /// Select WorkloadEntries/pods as endpoints instead.
    pub workload_selector: Option<EntryWorkloadSelector>,
    /// Namespaces this entry is visible to.
    pub export_to: Vec<String>,
    /// Accepted server SANs (SPIFFE IDs or DNS names).
    pub subject_alt_names: Vec<String>,
}

/// Where the service lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (no mTLS).
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// Endpoint discovery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Use the original destination address.
    None,
    /// Use the given endpoint addresses.
    Static,
    /// Resolve DNS, all addresses.
    Dns,
    /// Resolve DNS, first address.
    DnsRoundRobin,
    /// Resolve DNS per request (dynamic forward proxy).
    DynamicDns,
}

/// An endpoint of a ServiceEntry (the `WorkloadEntry` message).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadEntry {
    /// IP, DNS name or unix socket.
    pub address: Option<String>,
    /// Port name to endpoint port.
    pub ports: BTreeMap<String, u32>,
    /// Endpoint labels (for subsets).
    pub labels: Labels,
    /// Network of the endpoint.
    pub network: Option<String>,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    /// Load-balancing weight.
    pub weight: Option<u32>,
    /// Service account of the workload (its identity).
    pub service_account: Option<String>,
}

/// Workload selector of a ServiceEntry (`labels`, unlike the security selector).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EntryWorkloadSelector {
    /// Labels the workloads must carry.
    pub labels: Labels,
}
