//! Field paths and their `line:column` in the YAML source.
//!
//! serde gives typed values but forgets where they came from; validation needs the
//! location of arbitrary fields (`spec.http[1].route[0].weight`). A [`SourceMap`] is built
//! from the parser's events of one document and maps every field path to the position of
//! its key and value. It also answers the reverse question for deserialization errors:
//! which field is at this position.

use serde_saphyr::granit_parser::{Event, Parser};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    key: Option<Pos>,
    value: Pos,
    scalar: Option<String>,
}

/// Field path → location for one YAML document.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceMap {
    entries: Vec<Entry>,
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Appends a mapping key to a field path: `.name` for identifier-like keys, `["x-canary"]`
/// for anything else (header names, label keys, numeric ports).
pub(crate) fn push_key(path: &mut String, key: &str) {
    let ident = !key.is_empty()
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ident {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push_str("[\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                path.push('\\');
            }
            path.push(c);
        }
        path.push_str("\"]");
    }
}

/// Appends a sequence index to a field path: `[3]`.
pub(crate) fn push_index(path: &mut String, index: usize) {
    path.push('[');
    path.push_str(&index.to_string());
    path.push(']');
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, Pos)>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// Inside a complex (non-scalar) mapping key: not addressed by paths.
    Opaque,
}

impl SourceMap {
    /// Parses one document. `first_line` is the 1-based line of the text's first line in
    /// the file, so positions are file positions.
    pub fn parse(text: &str, first_line: usize) -> Result<SourceMap, SyntaxError> {
        let shift = first_line.saturating_sub(1);
        let mut entries = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let (event, span) = item.map_err(|e| SyntaxError {
                pos: Pos {
                    line: e.marker().line() + shift,
                    column: e.marker().col() + 1,
                },
                message: e.info().to_owned(),
            })?;
            let pos = Pos {
                line: span.start.line() + shift,
                column: span.start.col() + 1,
            };
            let (is_node, opens) = match &event {
                Event::Scalar(..) | Event::Alias(_) => (true, None),
                Event::MappingStart(..) => (true, Some(true)),
                Event::SequenceStart(..) => (true, Some(false)),
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                _ => continue,
            };
            if !is_node {
                continue;
            }
            // A node is either a mapping key or a value at a path.
            let child_path = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Opaque) => None,
                Some(Frame::Map { key, path }) => match key.take() {
                    None => {
                        if let Event::Scalar(value, ..) = &event {
                            *key = Some((value.to_string(), pos));
                            continue;
                        }
                        // Complex key: its content has no path.
                        stack.push(Frame::Opaque);
                        continue;
                    }
                    Some((k, key_pos)) => {
                        let mut p = path.clone();
                        push_key(&mut p, &k);
                        entries.push(Entry {
                            path: p.clone(),
                            key: Some(key_pos),
                            value: pos,
                            scalar: scalar_of(&event),
                        });
                        Some(p)
                    }
                },
                Some(Frame::Seq { path, next }) => {
                    let mut p = path.clone();
                    push_index(&mut p, *next);
                    *next += 1;
                    entries.push(Entry {
                        path: p.clone(),
                        key: None,
                        value: pos,
                        scalar: scalar_of(&event),
                    });
                    Some(p)
                }
            };
            if stack.is_empty() {
                entries.push(Entry {
                    path: String::new(),
                    key: None,
                    value: pos,
                    scalar: scalar_of(&event),
                });
            }
            match (opens, child_path) {
                (Some(true), Some(path)) => stack.push(Frame::Map { path, key: None }),
                (Some(false), Some(path)) => stack.push(Frame::Seq { path, next: 0 }),
                (Some(_), None) => stack.push(Frame::Opaque),
                (None, _) => {}
            }
        }
        Ok(SourceMap { entries })
    }

    /// Position of the value at `path`; for a path that is not in the document (a missing
    /// field), the position of the nearest ancestor that is.
    pub fn value(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.iter().find(|e| e.path == p) {
                return Some(e.value);
            }
            if p.is_empty() {
                return None;
            }
            p = parent(p);
        }
    }

    /// Position of the key of `path` (or of its value for sequence items and the root).
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|e| e.path == path)
            .map(|e| e.key.unwrap_or(e.value))
            .or_else(|| self.value(path))
    }

    /// The scalar text at `path`, if it is a scalar.
    pub fn scalar(&self, path: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.path == path)
            .and_then(|e| e.scalar.as_deref())
    }

    /// The scalar text of the node starting at `pos`, if any.
    pub fn scalar_at(&self, pos: Pos) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.value == pos)
            .and_then(|e| e.scalar.as_deref())
    }

    /// True when `path` is written in the document.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.path == path)
    }

    /// The field at `pos`: a key or value starting exactly there (the deepest one), else
    /// the last node that starts before `pos`.
    pub fn path_at(&self, pos: Pos) -> Option<(&str, bool)> {
        let exact_key = self.entries.iter().rev().find(|e| e.key == Some(pos));
        if let Some(e) = exact_key {
            return Some((&e.path, true));
        }
        let exact_value = self
            .entries
            .iter()
            .filter(|e| e.value == pos)
            .max_by_key(|e| e.path.len());
        if let Some(e) = exact_value {
            return Some((&e.path, false));
        }
        self.entries
            .iter()
            .filter(|e| e.value <= pos)
            .max_by_key(|e| e.value)
            .map(|e| (e.path.as_str(), false))
    }

    /// The deepest value starting exactly at `pos`.
    pub fn value_path_at(&self, pos: Pos) -> Option<&str> {
        self.entries
            .iter()
            .filter(|e| e.value == pos)
            .min_by_key(|e| e.path.len())
            .map(|e| e.path.as_str())
    }

    /// All paths written in the document, in document order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.path.as_str())
    }
}

fn scalar_of(event: &Event<'_>) -> Option<String> {
    match event {
        Event::Scalar(v, ..) => Some(v.to_string()),
        _ => None,
    }
}

/// The parent of a field path (`a.b[2]` → `a.b`, `a["x"]` → `a`, `a` → ``).
pub(crate) fn parent(path: &str) -> &str {
    if let Some(stripped) = path.strip_suffix("\"]") {
        // Find the matching `["` (keys may contain escaped quotes).
        let bytes = stripped.as_bytes();
        let mut i = stripped.len();
        while i >= 2 {
            if &bytes[i - 2..i] == b"[\"" && (i < 3 || bytes[i - 3] != b'\\') {
                return &path[..i - 2];
            }
            i -= 1;
        }
        return "";
    }
    if path.ends_with(']')
        && let Some(i) = path.rfind('[')
    {
        return &path[..i];
    }
    match path.rfind('.') {
        Some(i) => &path[..i],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
spec:
  hosts: [a, b]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: x}
      weight: 5
";

    #[test]
    fn maps_paths_to_lines_and_columns() {
        let m = SourceMap::parse(DOC, 1).unwrap();
        let v = |p: &str| m.value(p).map(|p| (p.line, p.column));
        assert_eq!(v("kind"), Some((2, 7)));
        assert_eq!(v("spec.hosts[1]"), Some((4, 14)));
        assert_eq!(
            v("spec.http[0].match[0].headers[\"end-user\"].exact"),
            Some((9, 18))
        );
        assert_eq!(v("spec.http[0].route[0].destination.host"), Some((11, 27)));
        assert_eq!(v("spec.http[0].route[0].weight"), Some((12, 15)));
        assert_eq!(
            m.key("spec.http[0].route[0].weight").map(|p| p.line),
            Some(12)
        );
        // Missing fields resolve to their nearest ancestor.
        assert_eq!(v("spec.http[0].timeout"), v("spec.http[0]"));
    }

    #[test]
    fn positions_are_shifted_to_file_lines() {
        let m = SourceMap::parse("a:\n  b: 1\n", 10).unwrap();
        assert_eq!(
            m.value("a.b"),
            Some(Pos {
                line: 11,
                column: 6
            })
        );
    }

    #[test]
    fn reverse_lookup_finds_the_field() {
        let m = SourceMap::parse(DOC, 1).unwrap();
        assert_eq!(
            m.path_at(Pos {
                line: 12,
                column: 7
            }),
            Some(("spec.http[0].route[0].weight", true))
        );
        assert_eq!(
            m.path_at(Pos {
                line: 12,
                column: 15
            }),
            Some(("spec.http[0].route[0].weight", false))
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = SourceMap::parse("a: [1, 2\nb: 3\n", 5).unwrap_err();
        assert!(e.pos.line >= 5, "{e:?}");
    }

    #[test]
    fn parent_strips_one_segment() {
        assert_eq!(parent("a.b[2]"), "a.b");
        assert_eq!(parent("a.b"), "a");
        assert_eq!(parent("a[\"x.y\"]"), "a");
        assert_eq!(parent("a"), "");
    }
}
