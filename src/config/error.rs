//! Configuration errors that point at the exact place of the mistake: file, line, column,
//! dotted key and what is wrong. A config is reported as a whole — every error at once — so
//! an operator fixes a file in one round instead of one error per restart.

use std::fmt;
use std::path::PathBuf;

/// One mistake in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, as it was given.
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based column in characters; 0 together with `line == 0`.
    pub column: usize,
    /// Dotted key path, e.g. `connectors.rally.api_key` or `flows[1].to`; empty for
    /// syntax errors and whole-file errors.
    pub key: String,
    /// What is wrong, and where useful how to fix it. Never contains a secret value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE:LINE:COL: KEY: MESSAGE`; the position is left out when there is none and the
    /// key when it is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All mistakes found in one config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The errors, sorted by line and column.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    /// One line per error.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Maps byte offsets of a text to 1-based line and character column.
#[derive(Debug)]
pub(crate) struct LineIndex<'s> {
    text: &'s str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'s> LineIndex<'s> {
    pub(crate) fn new(text: &'s str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    /// 1-based (line, column) of byte `offset` (clamped to the text).
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        // Spans from the parser always fall on char boundaries; guard anyway.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let idx = LineIndex::new("a = 1\nné = 2\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(6), (2, 1));
        // "é" is two bytes but one column.
        assert_eq!(idx.position(9), (2, 3));
        assert_eq!(idx.position(999), (3, 1));
    }

    #[test]
    fn display_names_file_line_column_key_and_message() {
        let e = ConfigError {
            file: "c.toml".into(),
            line: 3,
            column: 7,
            key: "connectors.rally.api_key".into(),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "c.toml:3:7: connectors.rally.api_key: boom");
    }
}
