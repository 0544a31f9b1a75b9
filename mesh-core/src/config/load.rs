//! Loading Istio YAML from files and directories.
//!
//! A path is a file or a directory; a directory contributes its `.yaml`/`.yml` files
//! (not recursive), sorted by name. Each file holds one or more documents separated by
//! `---` lines. Each document is parsed twice from the same text: once by the YAML event
//! parser into a [`SourceMap`] (field path → `line:column`), once by serde into the typed
//! resource. A document that fails does not stop the others.

use std::path::{Path, PathBuf};

use super::diagnostic::{Diagnostic, Severity};
use super::locate::{Pos, SourceMap, push_key};
use super::resource::{Document, is_other_istio};
use super::{AnyResource, validate};

/// Options of one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Namespace of resources without `metadata.namespace` (default `default`).
    pub default_namespace: String,
    /// The mesh root namespace: policies there without selector are mesh-wide (default
    /// `istio-system`).
    pub root_namespace: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            default_namespace: "default".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// The outcome of a load: the resources, every diagnostic, and a content version.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Resources that parsed, in load order (files sorted, documents in order). Resources
    /// with validation errors are included; check [`LoadReport::has_errors`].
    pub resources: Vec<AnyResource>,
    /// Errors, warnings and notes, in load order.
    pub diagnostics: Vec<Diagnostic>,
    /// Hash of the loaded documents' text; differs between versions of the config.
    pub version: u64,
    /// Source maps, parallel to `resources`.
    pub(crate) sources: Vec<SourceMap>,
}

impl LoadReport {
    /// True when any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.of(Severity::Error)
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.of(Severity::Warning)
    }

    /// The notes.
    pub fn notes(&self) -> impl Iterator<Item = &Diagnostic> {
        self.of(Severity::Note)
    }

    /// `line:column` of `path` (e.g. `spec.http[0].timeout`) in the document of
    /// `resources[index]`; for a path that is not written, its nearest written ancestor.
    pub fn location_of(&self, index: usize, path: &str) -> Option<(usize, usize)> {
        let pos = self.sources.get(index)?.value(path)?;
        Some((pos.line, pos.column))
    }

    /// `line:column` of the key of `path` (`timeout` in `timeout: 5s`) in the document of
    /// `resources[index]`; for a sequence item or the document itself, where its value
    /// starts; for a path that is not written, its nearest written ancestor. For tools
    /// that point a user at the field that decided something.
    pub fn key_location_of(&self, index: usize, path: &str) -> Option<(usize, usize)> {
        let pos = self.sources.get(index)?.key(path)?;
        Some((pos.line, pos.column))
    }

    /// A located error about `path` of `resources[index]`, for checks made outside this
    /// crate (for example a behaviour crate's `TryFrom` of a spec), so that they report
    /// like the loader does.
    pub fn error_at(
        &self,
        index: usize,
        path: &str,
        message: impl Into<String>,
    ) -> Option<Diagnostic> {
        let r = self.resources.get(index)?;
        let pos = self.location_of(index, path);
        Some(Diagnostic {
            severity: Severity::Error,
            file: r.origin().file.clone(),
            document: Some(r.origin().document),
            resource: Some(r.display_name()),
            path: (!path.is_empty()).then(|| path.to_owned()),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message: message.into(),
        })
    }

    /// Warnings for the `DENY` rules of `policies` whose `to.operation.ports` name a port
    /// outside `served`: such a condition never matches, so the rule does not deny what
    /// it reads as denying (ISTIO.md AP-48). Each is located at the port in its file.
    ///
    /// `policies` are resources of this load (for example
    /// [`MeshConfig::authorization_policies_for`](super::MeshConfig::authorization_policies_for)
    /// a workload); `served` is what the workload listens on.
    pub fn unserved_deny_ports<'a>(
        &self,
        policies: impl IntoIterator<Item = &'a super::AuthorizationPolicy>,
        served: &[u16],
    ) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let listed = served
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        for policy in policies {
            if policy.spec.action != Some(super::Action::Deny) {
                continue;
            }
            let index = policy.origin.seq;
            for (i, rule) in policy.spec.rules.iter().enumerate() {
                for (j, to) in rule.to.iter().flatten().enumerate() {
                    let Some(op) = &to.operation else { continue };
                    for (k, port) in op.ports.iter().enumerate() {
                        if port.parse::<u16>().is_ok_and(|p| served.contains(&p)) {
                            continue;
                        }
                        let path = format!("spec.rules[{i}].to[{j}].operation.ports[{k}]");
                        let Some(mut d) = self.error_at(
                            index,
                            &path,
                            format!(
                                "DENY for port {port}, which this workload does not serve \
                                 (it serves {listed}): this condition never matches, so the \
                                 rule denies nothing on it"
                            ),
                        ) else {
                            continue;
                        };
                        d.severity = Severity::Warning;
                        out.push(d);
                    }
                }
            }
        }
        out
    }

    fn of(&self, s: Severity) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(move |d| d.severity == s)
    }
}

/// Loads and validates files and directories.
///
/// Never fails as a whole: unreadable files, syntax errors, type errors and validation
/// errors all become [`Diagnostic`]s in the report, so one run shows every problem.
pub fn load_paths<P: AsRef<Path>>(paths: &[P], options: &LoadOptions) -> LoadReport {
    let mut loader = Loader::new(options);
    for path in paths {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => match yaml_files_in(path) {
                Ok(files) => {
                    if files.is_empty() {
                        loader.report.diagnostics.push(Diagnostic {
                            severity: Severity::Warning,
                            ..Diagnostic::file_error(path, "directory has no .yaml or .yml files")
                        });
                    }
                    for f in files {
                        loader.file(&f);
                    }
                }
                Err(e) => loader.report.diagnostics.push(Diagnostic::file_error(
                    path,
                    format!("cannot read directory: {e}"),
                )),
            },
            Ok(_) => loader.file(path),
            Err(e) => loader
                .report
                .diagnostics
                .push(Diagnostic::file_error(path, format!("cannot read: {e}"))),
        }
    }
    loader.finish()
}

/// Loads and validates YAML text as if it were the file `name`.
pub fn load_str(name: impl Into<PathBuf>, yaml: &str, options: &LoadOptions) -> LoadReport {
    let mut loader = Loader::new(options);
    loader.text(&name.into(), yaml);
    loader.finish()
}

fn yaml_files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

struct Loader<'a> {
    options: &'a LoadOptions,
    report: LoadReport,
    hash: Fnv,
}

impl<'a> Loader<'a> {
    fn new(options: &'a LoadOptions) -> Self {
        Loader {
            options,
            report: LoadReport::default(),
            hash: Fnv::new(),
        }
    }

    fn file(&mut self, path: &Path) {
        match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => self.text(path, &text),
                Err(e) => self.report.diagnostics.push(Diagnostic::file_error(
                    path,
                    format!(
                        "not UTF-8 text (invalid byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                )),
            },
            Err(e) => self
                .report
                .diagnostics
                .push(Diagnostic::file_error(path, format!("cannot read: {e}"))),
        }
    }

    fn text(&mut self, file: &Path, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, (first_line, doc)) in split_documents(text).into_iter().enumerate() {
            self.document(file, index + 1, first_line, &doc);
        }
    }

    fn document(&mut self, file: &Path, document: usize, first_line: usize, text: &str) {
        let base = Diagnostic {
            document: Some(document),
            ..Diagnostic::file_error(file, "")
        };
        let source = match SourceMap::parse(text, first_line) {
            Ok(m) => m,
            Err(e) => {
                self.report.diagnostics.push(Diagnostic {
                    line: Some(e.pos.line),
                    column: Some(e.pos.column),
                    message: format!("YAML syntax error: {}", e.message),
                    ..base
                });
                return;
            }
        };
        match serde_saphyr::from_str::<Document>(text) {
            Ok(Document::Istio(mut resource)) => {
                if resource.metadata().namespace.is_empty() {
                    resource.metadata_mut().namespace = self.options.default_namespace.clone();
                }
                *resource.origin_mut() = super::Origin {
                    file: file.to_path_buf(),
                    document,
                    seq: self.report.resources.len(),
                };
                self.hash.write(file.as_os_str().as_encoded_bytes());
                self.hash.write(text.as_bytes());
                let mut diags = Vec::new();
                validate::validate_resource(&resource, &source, &mut diags);
                self.report.diagnostics.extend(diags);
                self.report.resources.push(resource);
                self.report.sources.push(source);
            }
            Ok(Document::Other {
                api_version,
                kind,
                name,
            }) => {
                let istio = is_other_istio(api_version.as_deref());
                let gateway_api = api_version
                    .as_deref()
                    .is_some_and(super::resource::is_gateway_api);
                let class = gateway_api && kind.as_deref() == Some("GatewayClass");
                let what = format!(
                    "{} {}{}",
                    kind.as_deref().unwrap_or("?"),
                    api_version.as_deref().unwrap_or("?"),
                    name.map(|n| format!(" {n}")).unwrap_or_default()
                );
                let pos = source.value("kind");
                self.report.diagnostics.push(Diagnostic {
                    severity: if istio && !class {
                        Severity::Warning
                    } else {
                        Severity::Note
                    },
                    line: pos.map(|p| p.line),
                    column: pos.map(|p| p.column),
                    message: if class {
                        format!(
                            "skipped {what}: Gateways of class `{}` are served without it",
                            super::GATEWAY_CLASS
                        )
                    } else if gateway_api {
                        format!(
                            "skipped {what}: this Gateway API kind is not supported and has no \
                             effect"
                        )
                    } else if istio {
                        format!(
                            "skipped {what}: this Istio kind is not supported and has no effect"
                        )
                    } else {
                        format!("skipped {what}: not an Istio resource")
                    },
                    ..base
                });
            }
            Err(e) => {
                let resource = resource_name(&source, &self.options.default_namespace);
                let d = deserialize_error(&e, &source, first_line, Diagnostic { resource, ..base });
                self.report.diagnostics.push(d);
            }
        }
    }

    fn finish(mut self) -> LoadReport {
        self.report.version = self.hash.finish();
        validate::validate_all(&mut self.report);
        self.report
    }
}

/// `Kind/namespace/name` from the document's text, for errors before the typed resource
/// exists.
fn resource_name(source: &SourceMap, default_namespace: &str) -> Option<String> {
    let kind = source.scalar("kind")?;
    let name = source.scalar("metadata.name")?;
    let ns = source
        .scalar("metadata.namespace")
        .filter(|n| !n.is_empty())
        .unwrap_or(default_namespace);
    Some(format!("{kind}/{ns}/{name}"))
}

/// Turns a serde-saphyr error into a located diagnostic with a field path.
fn deserialize_error(
    e: &serde_saphyr::Error,
    source: &SourceMap,
    first_line: usize,
    base: Diagnostic,
) -> Diagnostic {
    let e = e.without_snippet();
    // serde-saphyr counts lines from the start of the document's text.
    let shift = first_line.saturating_sub(1);
    let (message, location) = match e {
        serde_saphyr::Error::Message { msg, location } => (msg.clone(), Some(*location)),
        other => (strip_location(&other.to_string()), other.location()),
    };
    let mut pos = location.filter(|l| l.line() > 0).map(|l| Pos {
        line: l.line() as usize + shift,
        column: l.column() as usize,
    });
    // "expected a sequence/mapping" is about the value at that position, not the first key
    // inside it.
    let about_value = message.starts_with("expected sequence start")
        || message.starts_with("expected mapping start");
    let found = pos.and_then(|p| {
        if about_value {
            source.value_path_at(p).map(|v| (v, false))
        } else {
            source.path_at(p)
        }
    });
    let at_key = found.is_some_and(|(_, key)| key);
    let mut path = found.map(|(p, _)| p.to_owned());
    let mut message = message;
    if message.contains("`spec` appears before `kind`") && !source.contains("kind") {
        message = "missing field `kind`; every document needs apiVersion and kind".to_owned();
    }
    // Errors raised by the envelope itself: point at the field they are about.
    let envelope_field = if message.contains("`spec` appears before `kind`") {
        Some("spec")
    } else if message.starts_with("apiVersion `") {
        Some("apiVersion")
    } else if message.starts_with("missing field `kind`") || pos.is_none() {
        Some("")
    } else {
        None
    };
    if let Some(at) = envelope_field {
        pos = if at == "apiVersion" {
            source.value(at)
        } else {
            source.key(at)
        };
        path = Some(at.to_owned());
    }
    if location.is_none_or(|l| l.line() == 0)
        && let Some(field) = between(&message, "unknown field `", "`")
        && source.contains(field)
    {
        pos = source.key(field);
        path = Some(field.to_owned());
    }
    // serde names a missing field in its message; point the path at it.
    if let (Some(p), Some(field)) = (&mut path, between(&message, "missing field `", "`")) {
        push_key(p, field);
    }
    let key_text = path
        .as_deref()
        .filter(|_| at_key)
        .map(|p| last_segment(p).to_owned());
    let value = pos
        .and_then(|p| source.scalar_at(p))
        .or(key_text.as_deref());
    if path.as_deref().is_none_or(str::is_empty) && message == "expected mapping start" {
        return Diagnostic {
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message: "a document must be a mapping with apiVersion, kind, metadata and spec"
                .to_owned(),
            ..base
        };
    }
    Diagnostic {
        line: pos.map(|p| p.line),
        column: pos.map(|p| p.column),
        path: path.filter(|p| !p.is_empty()),
        message: improve_message(&message, value),
        ..base
    }
}

fn last_segment(path: &str) -> &str {
    let rest = &path[super::locate::parent(path).len()..];
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    rest.strip_prefix("[\"")
        .and_then(|r| r.strip_suffix("\"]"))
        .unwrap_or(rest)
}

fn between<'s>(s: &'s str, start: &str, end: &str) -> Option<&'s str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

/// Removes a trailing " at line L column C" that some error renderings append.
fn strip_location(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// Rewrites terse messages into "what is wrong, what is allowed".
fn improve_message(m: &str, value: Option<&str>) -> String {
    let m = m.trim();
    if m.starts_with("budget breached") {
        return "the document exceeds the parser's limits (too many nodes, or aliases that \
                expand too far) and is rejected"
            .to_owned();
    }
    let shown = value
        .map(|v| format!("`{v}`"))
        .unwrap_or_else(|| "the value".to_owned());
    let number = |what: &str| format!("{shown} is not {what}");
    match m {
        "invalid i32" | "invalid i64" => number("a valid integer; expected a whole number"),
        "invalid u32" | "invalid u64" | "invalid u16" | "invalid u8" => {
            number("a valid non-negative integer; expected a whole number 0 or more")
        }
        "invalid f64" | "invalid f32" => number("a valid number"),
        "invalid bool" => number("a boolean; expected true or false"),
        "expected mapping start" => "expected a mapping (`key: value` lines) here".to_owned(),
        "expected sequence start" => "expected a list (`- item` lines or `[a, b]`) here".to_owned(),
        _ if m.starts_with("expected ") && m.ends_with(" scalar") => {
            format!("expected a single value here, not a list or mapping ({m})")
        }
        _ => m.to_owned(),
    }
}

/// Splits a YAML stream into its non-empty documents, returning each with the 1-based
/// line it starts on. Documents are separated by lines starting with `---` (content after
/// the marker stays, at its column); a `...` line ends a document. Documents holding only
/// comments and blank lines are dropped, so document numbers count real documents.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    let mut ended = false;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---"
            || bare.starts_with("--- ")
            || bare.starts_with("---\t")
            || bare.starts_with("--- #");
        if marker {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 1;
            ended = false;
            // Keep content after the marker at its column.
            current.push_str("   ");
            current.push_str(&line[3..]);
            continue;
        }
        if bare == "..." {
            ended = true;
            current.push('\n');
            continue;
        }
        if ended {
            // Directives or comments between `...` and the next `---`.
            current.push('\n');
            continue;
        }
        current.push_str(line);
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#')
            })
        })
        .collect()
}

/// FNV-1a, 64 bit: a stable content hash (the same text always gives the same version).
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_their_first_line() {
        let docs = split_documents("# c\na: 1\n---\nb: 2\n---\n# only comment\n---\nc: 3\n---\n");
        let lines: Vec<usize> = docs.iter().map(|d| d.0).collect();
        assert_eq!(lines, [1, 3, 7]);
        assert!(docs[1].1.contains("b: 2"));
    }

    #[test]
    fn tls_origination_without_roots_warns_that_connections_fail() {
        let dr = |tls: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: prod}}\n\
                 spec:\n  host: r\n  trafficPolicy:\n    tls: {tls}\n"
            )
        };
        let warned = |tls: &str| {
            load_str("dr.yaml", &dr(tls), &LoadOptions::default())
                .warnings()
                .filter(|w| w.path.as_deref() == Some("spec.trafficPolicy.tls"))
                .map(|w| w.message.clone())
                .collect::<Vec<_>>()
        };
        let w = warned("{mode: SIMPLE}");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("without caCertificates"), "{w:?}");
        assert!(warned("{mode: SIMPLE, caCertificates: /etc/ca.pem}").is_empty());
        assert!(warned("{mode: SIMPLE, insecureSkipVerify: true}").is_empty());
        assert!(warned("{mode: DISABLE}").is_empty());
    }

    #[test]
    fn content_after_marker_keeps_its_column() {
        let docs = split_documents("--- {a: 1}\n");
        assert_eq!(docs, [(1, "    {a: 1}\n".to_owned())]);
    }
}
