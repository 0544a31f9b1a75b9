//! gRPC status names, as Istio's YAML spells them (`fault.abort.grpcStatus: UNAVAILABLE`).

/// The gRPC status names in code order: `STATUS_NAMES[14] == "UNAVAILABLE"`.
pub const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The numeric code of a gRPC status name (`UNAVAILABLE` → 14), `None` for an unknown name.
pub fn status_code(name: &str) -> Option<u32> {
    STATUS_NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_codes() {
        assert_eq!(status_code("OK"), Some(0));
        assert_eq!(status_code("UNAVAILABLE"), Some(14));
        assert_eq!(status_code("UNAUTHENTICATED"), Some(16));
        assert_eq!(status_code("unavailable"), None);
    }
}
