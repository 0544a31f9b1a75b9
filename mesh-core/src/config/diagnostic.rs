//! Located messages about configuration: errors, warnings and notes.

use std::fmt;
use std::path::PathBuf;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Something the loader skipped on purpose (a `Deployment` in the directory).
    Note,
    /// Loaded, but something does not work the way the YAML suggests (a field that is
    /// parsed but not enforced).
    Warning,
    /// The configuration is rejected.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// A message about the configuration, with everything needed to find its cause.
///
/// Displayed as
/// `file:line:column: error: document N, Kind/namespace/name, field.path: message`,
/// leaving out the parts that are not known (an unreadable file has no line).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// Error, warning or note.
    pub severity: Severity,
    /// The file.
    pub file: PathBuf,
    /// 1-based index of the document in the file (non-empty documents only).
    pub document: Option<usize>,
    /// `Kind/namespace/name`, when known.
    pub resource: Option<String>,
    /// Field path such as `spec.http[1].route[0].weight`, when known.
    pub path: Option<String>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl Diagnostic {
    /// An error about a whole file.
    pub fn file_error(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            file: file.into(),
            document: None,
            resource: None,
            path: None,
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// True for [`Severity::Error`].
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `line:column`, when known.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        Some((self.line?, self.column?))
    }

    /// Rendered for an object read from an API rather than a file: the object
    /// (`Kind/namespace/name`) and the field path stand for the file and line, as
    /// `error: VirtualService/default/reviews, spec.http[0].route[1].weight: message`.
    /// Without a known resource, the file name stands for the object.
    pub fn in_object(&self) -> InObject<'_> {
        InObject(self)
    }
}

/// A [`Diagnostic`] displayed without file, document and line (see
/// [`Diagnostic::in_object`]).
#[derive(Debug, Clone, Copy)]
pub struct InObject<'a>(&'a Diagnostic);

impl fmt::Display for InObject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let object = match &d.resource {
            Some(r) => r.clone(),
            None => d.file.display().to_string(),
        };
        write!(f, "{}: {object}", d.severity)?;
        if let Some(p) = &d.path {
            write!(f, ", {p}")?;
        }
        write!(f, ": {}", d.message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}: ", self.severity)?;
        let mut parts = Vec::new();
        if let Some(d) = self.document {
            parts.push(format!("document {d}"));
        }
        if let Some(r) = &self.resource {
            parts.push(r.clone());
        }
        if let Some(p) = &self.path {
            parts.push(p.clone());
        }
        if !parts.is_empty() {
            write!(f, "{}: ", parts.join(", "))?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}
