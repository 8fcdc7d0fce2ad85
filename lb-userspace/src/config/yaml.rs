//! The generic half of the config checker: walking a marked YAML tree with field paths and
//! lines, shaping errors that name file, line and field, and reading scalars (text, numbers,
//! booleans) without YAML's implicit typing.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::Hash;
use std::ops::RangeInclusive;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Node, Span};

use super::{ConfigError, Result, SYNTAX_HINT};

pub(super) fn span_line(span: &Span) -> Option<usize> {
    span.start().map(|marker| marker.line())
}

pub(super) fn key_line(key: &MarkedScalarNode) -> Option<usize> {
    span_line(key.span())
}

/// The line to blame for a node. A block mapping's own span starts after its first key, and
/// on the next line for `-` alone on its line: its first key is where a reader looks.
pub(super) fn node_line(node: &Node) -> Option<usize> {
    match node {
        Node::Mapping(mapping) => mapping
            .iter()
            .next()
            .and_then(|(key, _)| key_line(key))
            .or_else(|| span_line(mapping.span())),
        _ => span_line(node.span()),
    }
}

pub(super) fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

pub(super) fn line_note(line: Option<usize>) -> String {
    line.map(|line| format!(" (line {line})"))
        .unwrap_or_default()
}

/// YAML's null: an empty value, `~` or `null`, unquoted.
pub(super) fn is_null(node: &Node) -> bool {
    node.as_scalar().is_some_and(|scalar| {
        scalar.may_coerce() && matches!(scalar.as_str(), "" | "~" | "null" | "Null" | "NULL")
    })
}

pub(super) fn kind(node: &Node) -> &'static str {
    match node {
        Node::Scalar(_) => "a single value",
        Node::Mapping(_) => "a mapping",
        Node::Sequence(_) => "a list",
    }
}

/// A node with its field path and the line to blame for it: the key's line for a mapping value
/// (the value of `port:` may sit on the next line, or be empty), the item's for a list item.
pub(super) struct Field<'n> {
    pub(super) node: &'n Node,
    pub(super) path: String,
    pub(super) line: Option<usize>,
}

/// A mapping whose keys have been checked against its schema.
pub(super) struct Fields<'n> {
    pub(super) mapping: &'n MarkedMappingNode,
    pub(super) path: String,
    pub(super) line: Option<usize>,
}

impl<'n> Fields<'n> {
    pub(super) fn entry(&self, key: &str) -> Option<Field<'n>> {
        self.mapping
            .iter()
            .find(|(name, _)| name.as_str() == key)
            .map(|(name, node)| Field {
                node,
                path: child_path(&self.path, key),
                line: key_line(name),
            })
    }

    /// An optional field; an empty value counts as absent.
    pub(super) fn get(&self, key: &str) -> Option<Field<'n>> {
        self.entry(key).filter(|field| !is_null(field.node))
    }
}

pub(super) struct Checker<'a> {
    pub(super) origin: &'a str,
}

impl Checker<'_> {
    pub(super) fn error(
        &self,
        line: Option<usize>,
        field: &str,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            origin: self.origin.to_owned(),
            line,
            field: field.to_owned(),
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    pub(super) fn error_at(
        &self,
        field: &Field<'_>,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        self.error(field.line, &field.path, problem, hint)
    }

    /// The YAML loader reads the first document of a stream and ignores the rest: a stray `---`
    /// would silently drop the tail of the config. Document markers only count at column 0, so
    /// a line scan finds them exactly.
    pub(super) fn single_document(&self, text: &str) -> Result<()> {
        let is_marker = |line: &str, marker: &str| {
            line.strip_prefix(marker)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        let mut content_seen = false;
        // Line of the `...` that closed the document.
        let mut ended_on = None;
        for (number, line) in (1..).zip(text.lines()) {
            let (starts_document, rest) = if is_marker(line, "---") {
                (true, line[3..].trim_start())
            } else if is_marker(line, "...") {
                if content_seen {
                    ended_on.get_or_insert(number);
                }
                continue;
            } else if line.starts_with('%') && !content_seen {
                continue; // A directive, like `%YAML 1.2`.
            } else {
                (false, line.trim_start())
            };
            let has_content = !rest.is_empty() && !rest.starts_with('#');
            let problem = if starts_document && (content_seen || ended_on.is_some()) {
                "a second YAML document starts here".to_owned()
            } else if let Some(end) = ended_on.filter(|_| has_content) {
                format!("content after the end of the document (`...` on line {end})")
            } else {
                content_seen |= has_content;
                continue;
            };
            return Err(self.error(
                Some(number),
                "",
                problem,
                "keep the whole config in one YAML document: remove the `---` or `...` separator",
            ));
        }
        Ok(())
    }

    pub(super) fn load_error(&self, text: &str, error: LoadError) -> ConfigError {
        let syntax = |at: marked_yaml::Marker, problem: &str, hint: &str| {
            self.error(
                Some(at.line()),
                "",
                format!("{problem} (column {})", at.column()),
                hint,
            )
        };
        match error {
            LoadError::ScanError(at, scan) => syntax(
                at,
                &format!("YAML syntax error: {}", scan.info()),
                SYNTAX_HINT,
            ),
            LoadError::TopLevelMustBeMapping(at) | LoadError::TopLevelMustBeSequence(at) => syntax(
                at,
                "the config must be a mapping of settings and `vips`",
                "start with a `vips:` line, as in the documented example",
            ),
            LoadError::UnexpectedAnchor(at) => syntax(
                at,
                "YAML anchors and aliases (&name, *name) are not supported",
                "write the values out in full",
            ),
            LoadError::UnexpectedTag(at) => syntax(
                at,
                "YAML tags (!name, !!type) are not supported",
                "remove the tag; values are read as text and checked per field",
            ),
            LoadError::MappingKeyMustBeScalar(at) => syntax(
                at,
                "a key must be a plain name",
                "use one of the documented keys",
            ),
            LoadError::DuplicateKey(keys) => {
                let key = keys.key.as_str();
                let field =
                    duplicate_key_path(text, &keys.prev_key).unwrap_or_else(|| key.to_owned());
                self.error(
                    key_line(&keys.key),
                    &field,
                    format!(
                        "`{key}` appears twice in one mapping{}",
                        line_note(key_line(&keys.prev_key))
                    ),
                    "keep one of them",
                )
            }
        }
    }

    /// Records `key` as seen at `item`, or names the earlier item it duplicates.
    pub(super) fn unique<K: Eq + Hash + fmt::Display>(
        &self,
        seen: &mut HashMap<K, (String, Option<usize>)>,
        key: K,
        item: &Field<'_>,
        hint: &str,
    ) -> Result<()> {
        match seen.entry(key) {
            Entry::Vacant(entry) => {
                entry.insert((item.path.clone(), item.line));
                Ok(())
            }
            Entry::Occupied(entry) => {
                let (first_path, first_line) = entry.get();
                Err(self.error_at(
                    item,
                    format!(
                        "duplicates {first_path}{}, both {}",
                        line_note(*first_line),
                        entry.key()
                    ),
                    hint,
                ))
            }
        }
    }

    /// `field` as a mapping with only the keys in `keys`.
    pub(super) fn fields<'n>(&self, field: &Field<'n>, keys: &[&str]) -> Result<Fields<'n>> {
        let Some(mapping) = field.node.as_mapping() else {
            return Err(self.error_at(
                field,
                format!("expected a mapping, found {}", kind(field.node)),
                format!("write `key: value` lines with the keys {}", keys.join(", ")),
            ));
        };
        if let Some(unknown) = mapping.keys().find(|key| !keys.contains(&key.as_str())) {
            return Err(self.error(
                key_line(unknown),
                &child_path(&field.path, unknown.as_str()),
                "unknown key",
                format!("valid keys here are {}", keys.join(", ")),
            ));
        }
        Ok(Fields {
            mapping,
            path: field.path.clone(),
            line: field.line,
        })
    }

    /// A field that must be present; its value may still be empty (checked by the caller).
    pub(super) fn require<'n>(
        &self,
        fields: &Fields<'n>,
        key: &str,
        hint: &str,
    ) -> Result<Field<'n>> {
        fields
            .entry(key)
            .ok_or_else(|| self.error(fields.line, &child_path(&fields.path, key), "missing", hint))
    }

    /// The items of a list; an empty value is an empty list.
    pub(super) fn list<'n>(&self, field: &Field<'n>, hint: &str) -> Result<Vec<Field<'n>>> {
        if is_null(field.node) {
            return Ok(Vec::new());
        }
        let Some(items) = field.node.as_sequence() else {
            return Err(self.error_at(
                field,
                format!("expected a list, found {}", kind(field.node)),
                hint,
            ));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(index, node)| Field {
                node,
                path: format!("{}[{index}]", field.path),
                line: node_line(node),
            })
            .collect())
    }

    pub(super) fn text<'n>(
        &self,
        field: &Field<'n>,
        expected: &str,
        hint: &str,
    ) -> Result<&'n str> {
        match field.node.as_scalar() {
            Some(_) if is_null(field.node) => {
                Err(self.error_at(field, format!("has no value, expected {expected}"), hint))
            }
            Some(scalar) => Ok(scalar.as_str()),
            None => Err(self.error_at(
                field,
                format!("expected {expected}, found {}", kind(field.node)),
                hint,
            )),
        }
    }

    /// A decimal number in `range`.
    pub(super) fn number(
        &self,
        field: &Field<'_>,
        range: RangeInclusive<u32>,
        hint: &str,
    ) -> Result<u32> {
        let text = self.text(field, "a number", hint)?;
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(self.error_at(
                field,
                format!("expected a whole number, found {text:?}"),
                hint,
            ));
        }
        // All digits: a parse failure can only be an overflow, which is out of range too.
        match text.parse::<u32>() {
            Ok(value) if range.contains(&value) => Ok(value),
            _ => Err(self.error_at(
                field,
                format!("{text} is out of range {}..={}", range.start(), range.end()),
                hint,
            )),
        }
    }

    pub(super) fn boolean(&self, field: &Field<'_>, hint: &str) -> Result<bool> {
        match self.text(field, "true or false", hint)? {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            text => Err(self.error_at(
                field,
                format!("expected true or false, found {text:?}"),
                hint,
            )),
        }
    }
}

/// Full path of the key that `first` (a key's first occurrence) names, found by loading the
/// text again with duplicate keys allowed; the loader's error only knows the key's name.
pub(super) fn duplicate_key_path(text: &str, first: &MarkedScalarNode) -> Option<String> {
    let target = first
        .span()
        .start()
        .map(|marker| (marker.line(), marker.column()))?;
    let root = marked_yaml::parse_yaml_with_options(0, text, LoaderOptions::default()).ok()?;
    find_key(&root, target, "")
}

pub(super) fn find_key(node: &Node, target: (usize, usize), path: &str) -> Option<String> {
    match node {
        Node::Scalar(_) => None,
        Node::Mapping(mapping) => mapping.iter().find_map(|(key, value)| {
            let key_path = child_path(path, key.as_str());
            let at = key
                .span()
                .start()
                .map(|marker| (marker.line(), marker.column()));
            if at == Some(target) {
                Some(key_path)
            } else {
                find_key(value, target, &key_path)
            }
        }),
        Node::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| find_key(item, target, &format!("{path}[{index}]"))),
    }
}
