//! Reliability as Tower layers.
//!
//! This crate owns: the per-request outer deadline (VirtualService `timeout`), retries
//! (`attempts`, `perTryTimeout`, `retryOn`, jittered back-off, budgets, replayable
//! bodies), outlier detection with the max-ejection cap, load balancing that skips
//! ejected endpoints, and connection-pool limits.
