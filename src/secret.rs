//! A string that must never be shown: API keys, client secrets, tokens. Its `Debug` and
//! `Display` print `[redacted]`; only [`Secret::expose`] gives the text, at the one place
//! that puts it on the wire.

use std::fmt;

/// A secret value. Deliberately not `Serialize`, so it cannot leak into JSON or status.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret text, for the header or form field that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("rk_live_topsecret");
        assert!(!format!("{s:?} {s}").contains("topsecret"));
        assert_eq!(s.expose(), "rk_live_topsecret");
    }
}
