//! Routing as configuration.
//!
//! This crate owns: VirtualService route tables (matches, first match wins), weighted
//! choice among destinations, DestinationRule subsets resolved to endpoints from a
//! static registry (ServiceEntry), fault injection, header operations and rewrites.
