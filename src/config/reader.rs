//! Reading a spanned TOML tree key by key. Serde stops at the first error; this reader
//! deserialises every value on its own, records each failure with its position and dotted
//! key, and carries on, so one pass finds every mistake in the file.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::{ConfigError, LineIndex};
use super::secret::SecretRef;

/// A value of the parsed document with its byte span.
pub(crate) type Node<'i> = Spanned<DeValue<'i>>;

/// Collects errors for one document.
pub(crate) struct Ctx<'s> {
    file: PathBuf,
    lines: LineIndex<'s>,
    pub(crate) errors: Vec<ConfigError>,
}

impl<'s> Ctx<'s> {
    pub(crate) fn new(text: &'s str, file: &Path) -> Self {
        Ctx {
            file: file.to_path_buf(),
            lines: LineIndex::new(text),
            errors: Vec::new(),
        }
    }

    /// Records an error at the start of `span`.
    pub(crate) fn error(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.lines.position(span.start);
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Records a serde error raised while deserialising `node` (found at `path`): the
    /// error's span locates the deepest key it concerns.
    pub(crate) fn de_error(&mut self, node: &Node<'_>, path: &str, err: &toml::de::Error) {
        let span = err.span().unwrap_or_else(|| node.span());
        let key = locate(node, &span, path).unwrap_or_else(|| path.to_string());
        self.error(&span, &key, err.message().trim().to_string());
    }
}

/// The dotted path of the deepest key under `node` whose key or value span holds the start
/// of `span`.
fn locate(node: &Node<'_>, span: &Range<usize>, path: &str) -> Option<String> {
    let inside = |r: Range<usize>| r.start <= span.start && span.start < r.end.max(r.start + 1);
    match node.get_ref() {
        DeValue::Table(t) => {
            for (k, v) in t.iter() {
                let child = join(path, k.get_ref());
                if let Some(deeper) = locate(v, span, &child) {
                    return Some(deeper);
                }
                if inside(k.span()) {
                    return Some(child);
                }
            }
        }
        DeValue::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                if let Some(deeper) = locate(v, span, &format!("{path}[{i}]")) {
                    return Some(deeper);
                }
            }
        }
        _ => {}
    }
    inside(node.span()).then(|| path.to_string())
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// A secret reference together with where it was written, so `load` can report a secret
/// that does not resolve at the right place.
#[derive(Debug, Clone)]
pub(crate) struct SecretSite {
    pub(crate) secret: SecretRef,
    pub(crate) key: String,
    pub(crate) span: Range<usize>,
    /// Secrets of disabled connectors are not fetched.
    pub(crate) enabled: bool,
}

/// One TOML table being read; knows which keys it accepts.
pub(crate) struct Table<'a, 'i> {
    pub(crate) path: String,
    pub(crate) span: Range<usize>,
    pub(crate) table: &'a DeTable<'i>,
    allowed: &'static [&'static str],
}

impl<'a, 'i> Table<'a, 'i> {
    /// Views `node` as a table accepting `allowed` keys; records an error if it is not a table.
    pub(crate) fn new(
        ctx: &mut Ctx<'_>,
        node: &'a Node<'i>,
        path: &str,
        allowed: &'static [&'static str],
    ) -> Option<Self> {
        match node.get_ref() {
            DeValue::Table(table) => Some(Table {
                path: path.to_string(),
                span: node.span(),
                table,
                allowed,
            }),
            other => {
                ctx.error(
                    &node.span(),
                    path,
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Dotted path of `key` in this table.
    pub(crate) fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Node<'i>> {
        debug_assert!(self.allowed.contains(&key), "key {key} not declared");
        self.table.get(key)
    }

    /// Like [`Table::get`], but a missing key is an error.
    pub(crate) fn require(&self, ctx: &mut Ctx<'_>, key: &str) -> Option<&'a Node<'i>> {
        let v = self.get(key);
        if v.is_none() {
            ctx.error(
                &self.span,
                &self.path,
                format!("missing required key `{key}`"),
            );
        }
        v
    }

    /// Reports every key that is not accepted here, suggesting the closest accepted one.
    pub(crate) fn finish(self, ctx: &mut Ctx<'_>) {
        for (k, _) in self.table.iter() {
            let name = k.get_ref();
            if self.allowed.contains(&name.as_ref()) {
                continue;
            }
            let mut msg = format!("unknown key `{name}`");
            if let Some(near) = closest(name, self.allowed) {
                msg.push_str(&format!("; did you mean `{near}`?"));
            } else {
                msg.push_str(&format!("; expected one of: {}", self.allowed.join(", ")));
            }
            ctx.error(&k.span(), &self.key_path(name), msg);
        }
    }

    /// A string value.
    pub(crate) fn string(&self, ctx: &mut Ctx<'_>, key: &str) -> Option<(String, Range<usize>)> {
        let node = self.get(key)?;
        as_string(ctx, node, &self.key_path(key)).map(|s| (s, node.span()))
    }

    /// A boolean value.
    pub(crate) fn bool(&self, ctx: &mut Ctx<'_>, key: &str) -> Option<bool> {
        let node = self.get(key)?;
        match node.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                type_error(ctx, node, &self.key_path(key), "a boolean", other);
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn int(&self, ctx: &mut Ctx<'_>, key: &str, min: i64, max: i64) -> Option<i64> {
        let node = self.get(key)?;
        let path = self.key_path(key);
        match node.get_ref() {
            DeValue::Integer(i) => match int_of(node) {
                Some(v) if (min..=max).contains(&v) => Some(v),
                _ => {
                    let bound = if max == i64::MAX {
                        format!("at least {min}")
                    } else {
                        format!("between {min} and {max}")
                    };
                    ctx.error(
                        &node.span(),
                        &path,
                        format!("{} is out of range: must be {bound}", i.as_str()),
                    );
                    None
                }
            },
            other => {
                type_error(ctx, node, &path, "an integer", other);
                None
            }
        }
    }

    /// A number (integer or float); `None` when absent or wrong.
    pub(crate) fn number(&self, ctx: &mut Ctx<'_>, key: &str) -> Option<(f64, Range<usize>)> {
        let node = self.get(key)?;
        let v = match node.get_ref() {
            DeValue::Integer(_) => int_of(node).map(|v| v as f64),
            DeValue::Float(_) => f64::deserialize(ValueDeserializer::from(node.clone())).ok(),
            other => {
                type_error(ctx, node, &self.key_path(key), "a number", other);
                return None;
            }
        };
        match v {
            Some(v) if v.is_finite() => Some((v, node.span())),
            _ => {
                ctx.error(&node.span(), &self.key_path(key), "number is not finite");
                None
            }
        }
    }

    /// A humane duration string (`"30s"`, `"5m"`, `"1h 30m"`); zero allowed only if `allow_zero`.
    pub(crate) fn duration(
        &self,
        ctx: &mut Ctx<'_>,
        key: &str,
        allow_zero: bool,
    ) -> Option<Duration> {
        let node = self.get(key)?;
        let path = self.key_path(key);
        as_duration(ctx, node, &path, allow_zero)
    }

    /// A string or a list of strings, as a list with each element's span.
    pub(crate) fn names(
        &self,
        ctx: &mut Ctx<'_>,
        key: &str,
    ) -> Option<Vec<(String, Range<usize>)>> {
        let node = self.get(key)?;
        let path = self.key_path(key);
        match node.get_ref() {
            DeValue::String(s) => Some(vec![(s.to_string(), node.span())]),
            DeValue::Array(a) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, e) in a.iter().enumerate() {
                    match as_string(ctx, e, &format!("{path}[{i}]")) {
                        Some(s) => out.push((s, e.span())),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            other => {
                type_error(ctx, node, &path, "a string or a list of strings", other);
                None
            }
        }
    }

    /// A secret reference; see [`SecretRef`].
    pub(crate) fn secret(&self, ctx: &mut Ctx<'_>, key: &str) -> Option<(SecretRef, Range<usize>)> {
        let node = self.require(ctx, key)?;
        let path = self.key_path(key);
        match node.get_ref() {
            DeValue::String(_) => {
                ctx.error(
                    &node.span(),
                    &path,
                    "secrets must not be written inline: use { env = \"VAR\" } or { file = \"path\" }",
                );
                None
            }
            DeValue::Table(_) => {
                let t = Table::new(ctx, node, &path, &["env", "file"])?;
                let env = t.string(ctx, "env");
                let file = t.string(ctx, "file");
                let empty = t.table.is_empty();
                t.finish(ctx);
                match (env, file) {
                    (Some((v, span)), None) => {
                        let valid = !v.is_empty()
                            && !v.contains('=')
                            && !v.contains('\0')
                            && !v.chars().any(char::is_whitespace);
                        if valid {
                            Some((SecretRef::Env(v), node.span()))
                        } else {
                            ctx.error(
                                &span,
                                &join(&path, "env"),
                                format!("{v:?} is not a valid environment variable name"),
                            );
                            None
                        }
                    }
                    (None, Some((f, span))) => {
                        if f.is_empty() {
                            ctx.error(&span, &join(&path, "file"), "secret file path is empty");
                            None
                        } else {
                            Some((SecretRef::File(PathBuf::from(f)), node.span()))
                        }
                    }
                    (Some(_), Some(_)) => {
                        ctx.error(&node.span(), &path, "give either `env` or `file`, not both");
                        None
                    }
                    (None, None) => {
                        if empty {
                            ctx.error(&node.span(), &path, "secret reference is empty: use { env = \"VAR\" } or { file = \"path\" }");
                        }
                        None
                    }
                }
            }
            other => {
                type_error(
                    ctx,
                    node,
                    &path,
                    "{ env = \"VAR\" } or { file = \"path\" }",
                    other,
                );
                None
            }
        }
    }

    /// A sub-table accepting `allowed`, if present.
    pub(crate) fn table(
        &self,
        ctx: &mut Ctx<'_>,
        key: &str,
        allowed: &'static [&'static str],
    ) -> Option<Table<'a, 'i>> {
        let node = self.get(key)?;
        Table::new(ctx, node, &self.key_path(key), allowed)
    }
}

/// Deserialises `node` with serde, recording the first error serde finds in it.
pub(crate) fn deserialize<T: DeserializeOwned>(
    ctx: &mut Ctx<'_>,
    node: &Node<'_>,
    path: &str,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(node.clone())) {
        Ok(v) => Some(v),
        Err(e) => {
            ctx.de_error(node, path, &e);
            None
        }
    }
}

/// The value of an integer node, if it fits an `i64`.
fn int_of(node: &Node<'_>) -> Option<i64> {
    i64::deserialize(ValueDeserializer::from(node.clone())).ok()
}

/// `node` as a string, or an error.
pub(crate) fn as_string(ctx: &mut Ctx<'_>, node: &Node<'_>, path: &str) -> Option<String> {
    match node.get_ref() {
        DeValue::String(s) => Some(s.to_string()),
        other => {
            type_error(ctx, node, path, "a string", other);
            None
        }
    }
}

/// `node` as a humane duration, or an error.
pub(crate) fn as_duration(
    ctx: &mut Ctx<'_>,
    node: &Node<'_>,
    path: &str,
    allow_zero: bool,
) -> Option<Duration> {
    let text = match node.get_ref() {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => {
            ctx.error(
                &node.span(),
                path,
                format!(
                    "a duration needs a unit: write \"{}s\" (or \"5m\", \"1h\")",
                    i.as_str()
                ),
            );
            return None;
        }
        other => {
            type_error(
                ctx,
                node,
                path,
                "a duration such as \"30s\" or \"5m\"",
                other,
            );
            return None;
        }
    };
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() && !allow_zero => {
            ctx.error(&node.span(), path, "duration must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            ctx.error(
                &node.span(),
                path,
                format!("invalid duration {text:?}: {e} (write e.g. \"30s\", \"5m\", \"1h 30m\")"),
            );
            None
        }
    }
}

/// Records "expected X, found Y" at `node`.
pub(crate) fn type_error(
    ctx: &mut Ctx<'_>,
    node: &Node<'_>,
    path: &str,
    expected: &str,
    found: &DeValue<'_>,
) {
    ctx.error(
        &node.span(),
        path,
        format!("expected {expected}, found {}", found.type_str()),
    );
}

/// The accepted name closest to `name`, if close enough to be a likely typo.
pub(crate) fn closest<'n>(name: &str, candidates: &[&'n str]) -> Option<&'n str> {
    candidates
        .iter()
        .map(|c| (edit_distance(&name.to_lowercase(), &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_typos_but_not_unrelated_names() {
        assert_eq!(
            closest("api_kye", &["api_key", "page_size"]),
            Some("api_key")
        );
        assert_eq!(closest("banana", &["api_key", "page_size"]), None);
    }
}
