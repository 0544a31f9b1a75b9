//! Istio's configuration resources, loaded from YAML with located errors and validated
//! with Istio's rules.
//!
//! This module owns the configuration model of the workspace: serde types for
//! `VirtualService`, `DestinationRule`, `Gateway`, `ServiceEntry` (with inline
//! `endpoints`), `WorkloadEntry`, `Sidecar`, `PeerAuthentication`, `AuthorizationPolicy`
//! and `RequestAuthentication`, the loader for files and
//! directories of multi-document YAML, validation, and [`MeshConfig`], the indexed snapshot
//! of one load that the behaviour crates compile their runtime tables from (each with a
//! `TryFrom` next to its own policy type).
//!
//! # Behaviour
//!
//! - Every `apiVersion` Istio serves is accepted: `networking.istio.io/v1alpha3`,
//!   `v1beta1` and `v1` for the networking kinds, `security.istio.io/v1beta1` and `v1` for
//!   the security kinds. They share one schema.
//! - Every field of istio/api's protos for these kinds is known. Unknown fields inside our
//!   resources (including `metadata`) are an **error**: a misspelled policy field must never
//!   silently widen access. Standard Kubernetes metadata (`uid`, `resourceVersion`, ...) and
//!   a top-level `status` are tolerated.
//! - Documents of other kinds (a `Deployment` next to a DestinationRule) are skipped with a
//!   note; other Istio kinds (`EnvoyFilter`, `WasmPlugin`, ...) are skipped with a warning.
//! - The Kubernetes Gateway API's `Gateway`, `HTTPRoute`, `GRPCRoute` and `ReferenceGrant`
//!   (`gateway.networking.k8s.io`) load too and become internal Istio Gateways and
//!   VirtualServices in [`MeshConfig`] (see [`KubernetesGatewaySpec`] and the module
//!   `gateway_api`'s rules); its other kinds are skipped with a warning.
//! - A ServiceEntry with a `workloadSelector` has as endpoints the WorkloadEntries of its
//!   namespace that it selects ([`MeshConfig`]); in Kubernetes, `discovery` sends the
//!   ready pods such a selector matches as WorkloadEntries too.
//! - [`MeshConfig::sidecar_for`] finds the `Sidecar` of a workload (ISTIO.md SR-33); its
//!   egress hosts ([`Sidecar::imports`](Resource::imports), SR-32) scope what `discovery`
//!   sends to the workload's proxy. A configuration loaded from files is not scoped.
//! - Fields that are parsed but not enforced by the proxy are reported as warnings; the list
//!   is the single table [`NOT_ENFORCED`].
//! - Short hosts are qualified with the resource's namespace ([`qualify_host`]);
//!   `metadata.namespace` absent means [`LoadOptions::default_namespace`].
//! - A path is a file or a directory; a directory contributes its `.yaml`/`.yml` files
//!   (not recursively), sorted by name. Documents are split on `---` lines; documents
//!   holding only comments are not counted.
//! - When the same `Kind/namespace/name` is defined twice, the later definition replaces
//!   the earlier one (as `kubectl apply` would) and the load warns.
//! - Cross-resource checks are warnings: a route to a subset no DestinationRule defines
//!   (it would fail with 503 `NC`), a gateway that is not defined, several namespace-wide
//!   PeerAuthentications (only the oldest applies), several Sidecars without
//!   `workloadSelector` in one namespace (only the oldest applies).
//! - Resources serialize back to Istio YAML with unset fields left out
//!   ([`MeshConfig::to_yaml`], for `/config_dump`); loading the dump gives the same
//!   resources.
//!
//! # Layer placement
//!
//! None: this is data, read when configuration is loaded or reloaded, never per request.
//! The behaviour crates convert these types into their own validated policies (routing
//! tables, retry and outlier policies, mTLS modes, authorization matchers) and the proxy
//! swaps the compiled tables atomically. [`LoadReport::error_at`] lets those conversions
//! report errors located like the loader's.
//!
//! # Errors
//!
//! Every [`Diagnostic`] names the file, the document (1-based, counting non-empty documents),
//! the resource (`Kind/namespace/name` when known), the field path
//! (`spec.http[1].route[0].weight`) and `line:column`, and says what is wrong and what is
//! allowed. Loading and validation collect all errors of all files, not just the first.
//!
//! # Choices that differ from Istio
//!
//! - `apiVersion` and `kind` must come before `spec` in a document (every Kubernetes tool
//!   writes them first); reading `spec` first would require buffering the document and lose
//!   error locations.
//! - A route `timeout` of `0s` is accepted (it disables the timeout); other durations must
//!   be at least 1ms with millisecond precision, as in Istio.
//! - `AuthorizationPolicy` with `action: CUSTOM` is rejected: external authorization
//!   providers are not supported, and a policy that cannot be enforced must not load.
//! - Exact `principals` (and `source.principal` conditions) must be Istio workload
//!   identities without the scheme (`<trust-domain>/ns/<ns>/sa/<sa>`); Istio accepts any
//!   string, but anything else can never match a peer, which silently breaks ALLOW rules
//!   and, worse, DENY rules. `spiffe://` in a principal is rejected with the fix.
//! - Condition keys must be attributes Istio knows (Istio ignores unknown keys, which
//!   would silently widen a DENY).
//! - A RequestAuthentication `jwtRules[].jwks` must be a JSON Web Key Set with at least
//!   one key at load time (Istio's webhook only checks the size; a set that cannot be
//!   parsed would reject every token); `targetRef`/`targetRefs` load with a warning and
//!   do not select workloads (as for AuthorizationPolicy).
//! - An empty `StringMatch` (`{}`) is only accepted where Istio gives it a meaning
//!   (presence of a header or query parameter); elsewhere (`uri: {}`) it is an error.
//! - A Gateway server's `credentialName` (and each `credentialNames` entry) must name a
//!   Secret of the Gateway's own namespace: a Secret name, optionally written
//!   `kubernetes://<name>`, `<namespace>/<name>`, `kubernetes://<namespace>/<name>` or
//!   `kubernetes-gateway://<namespace>/<name>` with the Gateway's namespace
//!   ([`SecretRef`]). Istio accepts any string and may serve another namespace's Secret
//!   after an authorization check; a name that is not a plain Secret name (a path, `..`,
//!   an escape, uppercase, empty) or names another namespace is an error here, so no form
//!   of the name can reach another namespace's key (ISTIO.md GW-10).
//! - A ServiceEntry whose `workloadSelector` has no labels selects no WorkloadEntry; in
//!   Istio it selects every WorkloadEntry of its namespace. `discovery`'s Kubernetes
//!   registry writes a Service without a selector (and without endpoints) that way, and
//!   such a Service selects nothing in Kubernetes or Istio.
//! - Regexes must compile with the `regex` crate (RE2 syntax without backreferences), the
//!   same class as Envoy's RE2.
//!
//! # Example
//!
//! ```
//! use mesh_core::config::{LoadOptions, MeshConfig};
//!
//! let yaml = r#"
//! apiVersion: networking.istio.io/v1
//! kind: VirtualService
//! metadata:
//!   name: reviews
//!   namespace: production
//! spec:
//!   hosts: [reviews]
//!   http:
//!   - route:
//!     - destination: {host: reviews, subset: v1}
//!       weight: 90
//!     - destination: {host: reviews, subset: v2}
//!       weight: 10
//! "#;
//! let (config, report) = MeshConfig::from_yaml_str("reviews.yaml", yaml, &LoadOptions::default()).unwrap();
//! // No DestinationRule defines the subsets: that loads, with a warning.
//! assert!(report.warnings().any(|w| w.message.starts_with("subset `v1` of reviews.production.svc.cluster.local")));
//! let vs = config.virtual_services_for_host("reviews.production.svc.cluster.local");
//! assert_eq!(vs[0].spec.http[0].route[1].weight, Some(10));
//!
//! let bad = yaml.replace("weight: 10", "weight: -1");
//! let errors = MeshConfig::from_yaml_str("reviews.yaml", &bad, &LoadOptions::default()).unwrap_err();
//! assert_eq!(
//!     errors[0].to_string(),
//!     "reviews.yaml:14:15: error: document 1, VirtualService/production/reviews, \
//!      spec.http[0].route[1].weight: weight -1 is negative; weights must be 0 or more",
//! );
//! ```

mod authorization_policy;
mod destination_rule;
mod diagnostic;
mod duration;
mod gateway;
mod gateway_api;
mod load;
mod locate;
mod peer_authentication;
mod request_authentication;
mod resource;
mod service_entry;
mod sidecar;
mod snapshot;
mod telemetry;
mod validate;
mod virtual_service;
mod warnings;

pub use authorization_policy::*;
pub use destination_rule::*;
pub use diagnostic::{Diagnostic, InObject, Severity};
pub use duration::{Duration, DurationError};
pub use gateway::*;
pub use gateway_api::*;
pub use load::{LoadOptions, LoadReport, load_paths, load_str};
pub use peer_authentication::*;
pub use request_authentication::*;
pub use resource::{
    AnyResource, AuthorizationPolicy, DestinationRule, Gateway, Kind, Labels, Metadata, Origin,
    PeerAuthentication, Percent, PortSelector, RequestAuthentication, Resource, ServiceEntry, Spec,
    StringMatch, VirtualService, WorkloadEntryResource, WorkloadSelector, exported, qualify_host,
};
pub use service_entry::*;
pub use sidecar::*;
pub use snapshot::MeshConfig;
pub use telemetry::*;
pub use virtual_service::*;
pub use warnings::{NOT_ENFORCED, NotEnforced};
