//! The table of fields that are parsed but not enforced.

use super::Kind;

/// A field that the loader accepts but the proxy does not act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotEnforced {
    /// The kind.
    pub kind: Kind,
    /// Path pattern: `.`-separated segments, `[]` for any index or map key, `**` for any
    /// number of segments.
    pub pattern: &'static str,
    /// What happens instead.
    pub effect: &'static str,
}

/// Fields parsed but not enforced.
pub const NOT_ENFORCED: &[NotEnforced] = &[];
