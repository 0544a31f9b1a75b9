//! AuthorizationPolicy: Istio's authorization semantics as a Tower layer.
//!
//! [`AuthzLayer`] decides every inbound HTTP request against the [`PolicySet`] that
//! applies to the workload and answers `403 Forbidden` with the body
//! `RBAC: access denied` without calling the inner service when the request is denied.
//!
//! # Behaviour
//!
//! - **Evaluation** (ISTIO.md AP-02): CUSTOM (unsupported, rejected at compilation) →
//!   DENY (any matching DENY policy denies) → ALLOW (no ALLOW policy: allow; an ALLOW
//!   policy matches: allow; otherwise deny). AUDIT policies never change the outcome;
//!   the first matching AUDIT rule is reported. `spec: {}` (ALLOW, no rules) denies
//!   everything, `rules: [{}]` allows everything, DENY/AUDIT without rules is rejected.
//!   Dry-run policies (`istio.io/dry-run`) are evaluated on their own and reported in
//!   [`AuthzDecision::dry_run`], never enforced.
//! - **Rules** (AP-10, AP-11): one `from` AND one `to` AND every `when`; fields inside a
//!   source/operation are ANDed, values ORed, `not*` fields must match none.
//! - **Strings** (AP-20..AP-22): exact, `prefix*`, `*suffix`, `*` (non-empty); a `*`
//!   elsewhere and every `.` are literal, so `serviceAccounts` and principals match
//!   literally (CVE-2026-39350). Principals are the peer's SPIFFE ID without
//!   `spiffe://`; namespaces are read from an Istio-form ID (`…/ns/<ns>/sa/<sa>`), where
//!   a `*` anywhere in a namespace value matches any run of characters. Hosts and SNI
//!   are case-insensitive; a host value matches either the host as sent or the host
//!   without port and trailing dot. Paths are case-sensitive and support URI templates
//!   (`{*}` one segment, `{**}` the rest).
//! - **Peer identity** comes from the [`PeerIdentity`] request extension (set by the TLS
//!   accept path) and addresses from [`ConnectionInfo`] (`ipBlocks`/`source.ip` use the
//!   peer address, `ports`/`destination.*` the local address). Plaintext callers have no
//!   principal, so `principals: ["*"]` excludes them.
//! - **Path canonicalization** ([`canonicalize`]): applied once, before matching, and the
//!   request URI is rewritten to the canonical path (query kept) so the inner service
//!   receives exactly what was authorized. Malformed escapes, `%00`, control bytes and
//!   (by default) `;` path parameters are answered with 400.
//! - **Cost**: rules are indexed at compilation by a key the request must produce for
//!   the rule to apply (exact principal, `/`-bounded principal prefix or suffix,
//!   namespace, exact path or path prefix), so a decision evaluates only candidate
//!   rules, in declaration order, with the same result as evaluating every rule. A
//!   decision allocates nothing, except to join a repeated header that a condition
//!   inspects.
//! - **Malformed requests** (AP-44): a method with lower-case letters, a repeated or
//!   non-ASCII `Host` are answered with 400 (whitespace in header names is rejected by
//!   hyper before any layer runs).
//!
//! # Choices that differ from Istio
//!
//! - **JWT attributes** (RA-09, RA-10, AP-30) come from the [`RequestAuth`] that
//!   [`AuthnLayer`] puts in the request extensions: `requestPrincipals` split at the last
//!   `/` into issuer and subject matchers as Istio does (`*` needs a token with a
//!   non-empty `iss` and `sub`); `request.auth.principal` matches `<iss>/<sub>`;
//!   `request.auth.audiences` (`aud`), `request.auth.presenter` (`azp`) and
//!   `request.auth.claims[a][b]` match a string claim or any string of a list claim,
//!   `scope`, `permission` and `spaceDelimitedClaims` split on spaces. A request without
//!   a validated token has none of them (`notRequestPrincipals: ["*"]` matches it). On
//!   TCP connections they are unknown: an ALLOW rule never matches through them, a DENY
//!   rule applies as if they matched (AP-30).
//! - **Unknowable attributes.** Evaluation is three-valued: an attribute the layer
//!   cannot know (a missing [`ConnectionInfo`] for IP and port fields, a
//!   `connection.sni` condition on a TLS connection, since the SNI is not carried in the
//!   request, header values that are not valid text, obs-text, CVE-2026-73552) is
//!   *unknown*: an ALLOW rule matches only if it matches whatever the unknown values
//!   are, a DENY/AUDIT rule matches unless it fails whatever they are.
//! - **Unknown condition keys** (including `experimental.envoy.filters.*`) are rejected
//!   instead of ignored: an unsupported field fails closed (CVE-2022-21679).
//! - **`;` path parameters** are rejected with 400 by default; [`PathParameters::Strip`]
//!   strips them instead. Istio passes them through.
//! - **Hosts** also match without their port and trailing dot (SECURITY.md), so
//!   `DENY hosts: [secret.com]` also denies `Host: secret.com:80`.
//! - **Duplicate headers** are joined with `", "` (RFC 9110) before matching; when one
//!   line alone would match but the joined field does not, the result is unknown (a DENY
//!   applies, an ALLOW does not), since a backend may read only one of the lines.
//! - Policies with `targetRefs` apply to the Gateway API gateways they name (AP-50 in
//!   this crate's ISTIO.md), never to sidecars. TCP (non-HTTP)
//!   connections are decided with [`PolicySet::evaluate_connection`] (AP-30, with the
//!   same three-valued rule; the layer itself is HTTP only). Trust-domain aliases (AP-24) apply
//!   when the [`Workload`] names them ([`PolicySet::for_workload`]).
//!
//! # Layer placement
//!
//! Inbound, inside the per-connection service that inserts [`PeerIdentity`] and
//! [`ConnectionInfo`], after [`AuthnLayer`] (RequestAuthentication), outside telemetry's
//! inner parts and the application. The decision
//! is inserted into the request extensions (for inner layers) and the response
//! extensions (for telemetry and the access log) as [`AuthzDecision`].
//!
//! # Errors
//!
//! The layer adds no error type: denials are `403` responses, malformed requests `400`
//! responses, and the inner service's errors pass through. [`PolicySet::compile`]
//! returns a [`PolicyError`] naming the policy, the field and the problem.
//!
//! # Fuzzing
//!
//! The `fuzz/` crate (cargo-fuzz, outside the workspace) has two targets:
//! `authz_canonicalize` (canonicalization never panics; accepted output is stable and
//! free of fragments, parameters, dot segments) and `authz_match` (compilation and
//! evaluation never panic; a rule set that matches as ALLOW also matches as DENY).
//! Run them from the repository root with `cargo +nightly fuzz run authz_canonicalize`
//! and `cargo +nightly fuzz run authz_match` (`cargo install cargo-fuzz` first); on
//! stable, `cargo check --manifest-path fuzz/Cargo.toml` at least type-checks them.
//!
//! # Example
//!
//! ```
//! use mesh_tls::authz::{Action, AuthzLayer, Operation, Policy, PolicySet, Rule, Source};
//! use tower::ServiceBuilder;
//!
//! let policy = Policy::new("production", "payment-policy", Action::Allow, vec![Rule {
//!     from: Some(vec![Source {
//!         principals: vec!["cluster.local/ns/production/sa/order-service".into()],
//!         ..Source::default()
//!     }]),
//!     to: Some(vec![Operation {
//!         methods: vec!["POST".into()],
//!         paths: vec!["/api/v1/payments".into(), "/api/v1/payments/*".into()],
//!         ..Operation::default()
//!     }]),
//!     when: vec![],
//! }]);
//! let layer = AuthzLayer::new(PolicySet::compile([&policy]).unwrap());
//! let handle = layer.handle(); // handle.store(new_set) on reload
//! let service = ServiceBuilder::new().layer(layer).service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! });
//! # let _ = (service, handle);
//! ```
//!
//! [`RequestAuth`]: crate::authn::RequestAuth
//! [`AuthnLayer`]: crate::authn::AuthnLayer
//! [`PeerIdentity`]: mesh_core::PeerIdentity
//! [`ConnectionInfo`]: mesh_core::ConnectionInfo
//! [`AuthzDecision`]: mesh_core::AuthzDecision
//! [`AuthzDecision::dry_run`]: mesh_core::AuthzDecision::dry_run
//! [`PathParameters::Strip`]: normalize::PathParameters::Strip

mod layer;
mod matcher;
pub mod normalize;
mod policy;

pub use layer::{Authz, AuthzBody, AuthzLayer, DENIED_BODY, PolicyHandle, ResponseFuture};
pub use matcher::{PolicyError, PolicySet, RequestAttributes, ServerName};
pub use mesh_core::extensions::{AuthzDecision, DryRunDecision, MatchedPolicy};
pub use normalize::{
    Canonical, NormalizeOptions, PathError, PathNormalization, PathParameters, canonicalize,
};
pub use policy::{
    Action, Condition, DRY_RUN_ANNOTATION, Operation, Policy, Rule, Source, Workload,
};
