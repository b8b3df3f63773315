//! Secret-safe rendering of URLs, query strings, headers and response text for logs and
//! errors (invariant 6). Everything the HTTP layer prints goes through here.

use reqwest::header::HeaderName;
use url::Url;

/// Query or form parameter names whose values are secrets.
pub const SECRET_PARAMS: &[&str] = &[
    "client_secret",
    "access_token",
    "refresh_token",
    "api_key",
    "apikey",
    "code",
    "password",
    "token",
];

/// Header names whose values are secrets.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "set-cookie",
];

/// The placeholder printed instead of a secret.
pub const REDACTED: &str = "[redacted]";

/// True if a query/form parameter named `name` carries a secret.
pub fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// True if a header named `name` carries a secret.
pub fn is_secret_header(name: &HeaderName) -> bool {
    SECRET_HEADERS
        .iter()
        .any(|h| name.as_str().eq_ignore_ascii_case(h))
}

/// The URL with secret query values and any userinfo password replaced by `[redacted]`.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) {
                    REDACTED.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// The URL's path only (no host, no query): what debug logs show.
pub fn url_path(url: &Url) -> &str {
    url.path()
}

/// `pairs` with secret values replaced, for `Debug` of queries and forms.
pub fn redact_pairs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_param(k) {
                REDACTED
            } else {
                v.as_str()
            };
            (k.as_str(), v)
        })
        .collect()
}

/// Free text (a response body quoted in an error) with secret-looking values scrubbed:
/// `name=value` and `"name": "value"` for every secret parameter name, and `Bearer xyz`.
/// Also truncated to `max_chars`, so a huge HTML page does not flood a log line.
pub fn redact_text(text: &str, max_chars: usize) -> String {
    let mut out = text.to_string();
    for name in SECRET_PARAMS.iter().chain(["x-api-key"].iter()) {
        out = scrub_after(&out, &format!("{name}="), |c| c == '&' || c.is_whitespace());
        out = scrub_json_value(&out, name);
    }
    out = scrub_after(&out, "Bearer ", |c| c.is_whitespace() || c == '"');
    out = scrub_after(&out, "bearer ", |c| c.is_whitespace() || c == '"');
    if out.chars().count() > max_chars {
        let cut: String = out.chars().take(max_chars).collect();
        format!("{cut}…")
    } else {
        out
    }
}

/// Replaces the text after each case-insensitive `marker` up to `end` with `[redacted]`.
fn scrub_after(text: &str, marker: &str, end: impl Fn(char) -> bool) -> String {
    let lower = text.to_ascii_lowercase();
    let marker_l = marker.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(found) = lower[pos..].find(&marker_l) {
        let start = pos + found + marker.len();
        // Only whole names: `xcode=` must not match `code=`.
        let at = pos + found;
        let whole = at == 0
            || !text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&text[pos..start]);
        let rest = &text[start..];
        let len = rest.find(&end).unwrap_or(rest.len());
        if whole && len > 0 {
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[..len]);
        }
        pos = start + len;
    }
    out.push_str(&text[pos..]);
    out
}

/// Replaces the string value of JSON member `"name": "…"` (case-insensitive name).
fn scrub_json_value(text: &str, name: &str) -> String {
    let key = format!("\"{name}\"");
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(found) = lower[pos..].find(&key) {
        let after_key = pos + found + key.len();
        out.push_str(&text[pos..after_key]);
        let rest = &text[after_key..];
        let trimmed = rest.trim_start_matches([' ', ':', '\t']);
        let skipped = rest.len() - trimmed.len();
        if rest[..skipped].contains(':') && trimmed.starts_with('"') {
            // Find the closing quote, honouring backslash escapes.
            let body = &trimmed[1..];
            let mut end = None;
            let mut escaped = false;
            for (i, c) in body.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(body.len());
            out.push_str(&rest[..skipped]);
            out.push('"');
            out.push_str(REDACTED);
            out.push('"');
            pos = after_key + skipped + 1 + (end + 1).min(body.len());
        } else {
            pos = after_key;
        }
    }
    out.push_str(&text[pos..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_secret_params_are_redacted_and_others_kept() {
        let u = Url::parse(
            "https://x.mktorest.com/identity/oauth/token?grant_type=client_credentials&client_id=abc&client_secret=s3cr3t&access_token=tok123",
        )
        .unwrap();
        let s = redact_url(&u);
        assert!(!s.contains("s3cr3t") && !s.contains("tok123"), "{s}");
        assert!(s.contains("client_id=abc"), "{s}");
        assert!(s.contains("grant_type=client_credentials"), "{s}");
    }

    #[test]
    fn url_password_is_redacted() {
        let u = Url::parse("https://user:hunter2@example.com/p").unwrap();
        assert!(!redact_url(&u).contains("hunter2"));
    }

    #[test]
    fn text_scrubs_query_json_and_bearer_forms() {
        let t = r#"refresh_token=rt_1&x=1 {"access_token": "at_2", "other": "ok"} Authorization: Bearer at_3"#;
        let s = redact_text(t, 1000);
        for secret in ["rt_1", "at_2", "at_3"] {
            assert!(!s.contains(secret), "{secret} leaked in {s}");
        }
        assert!(s.contains(r#""other": "ok""#), "{s}");
        assert!(s.contains("x=1"), "{s}");
    }

    #[test]
    fn text_is_truncated() {
        let s = redact_text(&"a".repeat(50), 10);
        assert_eq!(s, format!("{}…", "a".repeat(10)));
    }

    #[test]
    fn similar_names_are_not_scrubbed() {
        let s = redact_text("zipcode=12345", 100);
        assert_eq!(s, "zipcode=12345");
    }
}
