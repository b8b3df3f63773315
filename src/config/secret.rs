//! Where a secret comes from (an environment variable or a file, never the config text) and
//! how it is fetched. Errors name the variable or file, never the value.

use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// A reference to a secret. TOML: `{ env = "VAR" }` or `{ file = "path" }`; a plain string
/// is rejected so that secrets never sit in the config file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// The value of an environment variable.
    Env(String),
    /// The content of a file (one trailing newline removed). A relative path resolves
    /// against `$CREDENTIALS_DIRECTORY` when set (systemd `LoadCredential=`), else
    /// against the working directory.
    File(PathBuf),
}

/// Why a secret could not be fetched. Never carries the secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The environment variable does not exist.
    #[error("env var {0} is not set")]
    EnvNotSet(String),
    /// The environment variable is not valid Unicode.
    #[error("env var {0} is not valid UTF-8")]
    EnvNotUnicode(String),
    /// The environment variable is set but empty.
    #[error("env var {0} is empty")]
    EnvEmpty(String),
    /// The secret file cannot be read.
    #[error("cannot read secret file {}: {source}{hint}", path.display())]
    FileUnreadable {
        /// The path that was tried (after `$CREDENTIALS_DIRECTORY` resolution).
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
        /// What may be wrong beyond the I/O failure (empty, or starting with a space).
        hint: &'static str,
    },
    /// The secret file is not UTF-8 text.
    #[error("secret file {} is not UTF-8 text", .0.display())]
    FileNotUnicode(PathBuf),
    /// The secret file is empty (or only a newline).
    #[error("secret file {} is empty", .0.display())]
    FileEmpty(PathBuf),
}

impl SecretRef {
    /// Fetches the secret now: reads the env var or the file. A file's single trailing
    /// newline (`\n` or `\r\n`), which editors and `echo` add, is not part of the secret.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env(var) => match std::env::var(var) {
                Ok(v) if v.is_empty() => Err(SecretError::EnvEmpty(var.clone())),
                Ok(v) => Ok(Secret::new(v)),
                Err(std::env::VarError::NotPresent) => Err(SecretError::EnvNotSet(var.clone())),
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(SecretError::EnvNotUnicode(var.clone()))
                }
            },
            SecretRef::File(p) => {
                let path = Self::file_path(p);
                let bytes = std::fs::read(&path).map_err(|source| SecretError::FileUnreadable {
                    path: path.clone(),
                    source,
                    hint: if path.is_relative() {
                        " (read from the current directory: a relative path is looked up in \
                         $CREDENTIALS_DIRECTORY, which systemd sets; by hand, set it to the \
                         credentials directory, e.g. /etc/crmbridge/credentials)"
                    } else {
                        ""
                    },
                })?;
                let mut text = String::from_utf8(bytes)
                    .map_err(|_| SecretError::FileNotUnicode(path.clone()))?;
                if text.ends_with("\r\n") {
                    text.truncate(text.len() - 2);
                } else if text.ends_with('\n') {
                    text.truncate(text.len() - 1);
                }
                if text.is_empty() {
                    return Err(SecretError::FileEmpty(path));
                }
                Ok(Secret::new(text))
            }
        }
    }

    /// Where a file secret is read from: absolute paths as written, relative ones under
    /// `$CREDENTIALS_DIRECTORY` when systemd set it.
    fn file_path(p: &Path) -> PathBuf {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if p.is_relative() && !dir.is_empty() => Path::new(&dir).join(p),
            _ => p.to_path_buf(),
        }
    }

    /// Short description for summaries: `env RALLY_API_KEY` or `file rally.key`.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(v) => format!("env {v}"),
            SecretRef::File(p) => format!("file {}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_secret_loses_exactly_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "abc\n\n").unwrap();
        let s = SecretRef::File(p).resolve().unwrap();
        assert_eq!(s.expose(), "abc\n");
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let err = SecretRef::File("/nonexistent/crmbridge-test.key".into())
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/crmbridge-test.key"),
            "{err}"
        );
    }

    #[test]
    fn missing_env_error_names_the_variable() {
        let err = SecretRef::Env("CRMBRIDGE_UNIT_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "env var CRMBRIDGE_UNIT_SURELY_UNSET_VAR is not set"
        );
    }
}
