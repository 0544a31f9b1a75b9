//! `discovery`: the control plane over the Kubernetes API.
//!
//! One stateless Deployment (two replicas or more; no leader is needed to serve) that
//! watches Istio's resources, Services, EndpointSlices, Pods and Namespaces
//! ([`kube`], [`registry`]), validates each object with the loader's diagnostics, pushes
//! each sidecar only what its workload needs over the xDS transport ([`xds`]), signs
//! workload certificates for callers authenticated by TokenReview ([`ca`]) and validates
//! Istio resources at `kubectl apply` ([`webhook`]).

pub mod ca;
pub mod kube;
pub mod registry;
pub mod webhook;
pub mod xds;
