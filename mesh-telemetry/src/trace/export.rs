//! Span export (placeholder replaced below).
