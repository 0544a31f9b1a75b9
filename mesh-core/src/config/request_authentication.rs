//! `RequestAuthentication` (`security.istio.io`): which JWTs a workload accepts, where
//! they are read from and where their keys come from. Field names follow istio/api
//! `request_authentication.proto` and `jwt.proto`.

use serde::{Deserialize, Serialize};

use super::{Duration, PolicyTargetReference, WorkloadSelector};

/// The `spec` of a RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestAuthenticationSpec {
    /// Workloads this applies to; absent means the namespace (mesh in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateways or services this applies to (instead of `selector`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The accepted issuers and how their tokens are checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer (`jwtRules[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct JwtRule {
    /// The token's `iss` must equal this (required).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub issuer: String,
    /// The token's `aud` must contain one of these; empty accepts any audience.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the JSON Web Key Set is fetched from (`http`/`https`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// An inline JSON Web Key Set (instead of `jwksUri`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token is read from, with an optional value prefix (`Bearer `).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token is read from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies the token is read from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// A header that receives the token's payload (base64url of its JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Headers that receive claims of the token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request forwarded to the application.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Timeout of one JWKS fetch (default 5s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Claims whose string value is a space-separated list (besides `scope` and
    /// `permission`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
}

/// A header a token is read from (`fromHeaders[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct JwtHeader {
    /// The header name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The prefix before the token in the value (e.g. `Bearer `).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A claim copied to a request header (`outputClaimToHeaders[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClaimToHeader {
    /// The header that receives the claim.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub header: String,
    /// The claim (`a.b.c` for nested claims).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub claim: String,
}
