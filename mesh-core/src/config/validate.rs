//! Validation with Istio's rules.

use super::AnyResource;
use super::diagnostic::Diagnostic;
use super::load::LoadReport;
use super::locate::SourceMap;

/// Validates one resource, appending diagnostics.
pub(crate) fn validate_resource(_r: &AnyResource, _source: &SourceMap, _out: &mut Vec<Diagnostic>) {
}

/// Checks across resources of one load.
pub(crate) fn validate_all(_report: &mut LoadReport) {}
