//! How amoCRM answers are read: 204 is an empty success, 429 (JSON or HTML, with or
//! without `Retry-After`) is a throttle, a 403 that is not a permission problem is a ban
//! (circuit open for a cool-down, never retried), and for batch writes the 400/422/504
//! answers are handed back to the push logic, which splits or rejects per item.

use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use crate::http::{ApiResponse, Classifier, Outcome, parse_retry_after, status_class};

/// The least we wait after a 429: amoCRM's HTML 429 says nothing about when to return.
pub const MIN_THROTTLE_WAIT: Duration = Duration::from_secs(1);

/// Which kind of call is being classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// API reads (lists, account, catalogue).
    Read,
    /// Batch `POST`/`PATCH /api/v4/companies`: 400, 413, 422 and 504 come back to the
    /// caller as successes so it can reject items or split the batch.
    BatchWrite,
    /// `POST /oauth2/access_token`: any 403 is a ban, a 401 is final (the refresh token
    /// is dead, no refresh could help).
    Token,
}

/// The amoCRM [`Classifier`].
#[derive(Debug, Clone, Copy)]
pub struct AmoClassifier {
    /// The kind of call.
    pub kind: CallKind,
    /// How long the circuit stays open after a ban (403 HTML).
    pub ban_cooldown: Duration,
}

/// True when the body is an amoCRM problem document (JSON), as opposed to nginx HTML.
fn is_problem_json(resp: &ApiResponse) -> bool {
    resp.json.is_some()
}

/// Whether a 403 is a ban rather than a permission problem: an HTML page (nginx's), or a
/// JSON one that says the account or address is blocked or over its limit.
fn is_ban(resp: &ApiResponse) -> bool {
    if !is_problem_json(resp) {
        return true;
    }
    let text = resp.text_snippet().to_lowercase();
    ["block", "banned", "ban ", "rate limit", "too many"]
        .iter()
        .any(|w| text.contains(w))
}

/// The `retry_after` of a JSON 429 body, if any.
fn body_retry_after(resp: &ApiResponse) -> Option<Duration> {
    let v = resp.json.as_ref()?.get("retry_after")?;
    let secs = match v {
        Value::Number(n) => n.to_string().parse::<f64>().ok()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    // `try_`: a negative, NaN or astronomically large value (`1e30`, found by fuzzing)
    // is no usable wait, not a reason to panic; the HTTP layer caps sane ones.
    Duration::try_from_secs_f64(secs).ok()
}

impl Classifier for AmoClassifier {
    fn classify(&self, resp: &ApiResponse) -> Outcome {
        let status = resp.status.as_u16();
        match status {
            200..=299 => Outcome::Success,
            429 => {
                let after = parse_retry_after(&resp.headers, Utc::now())
                    .or_else(|| body_retry_after(resp))
                    .unwrap_or_default()
                    .max(MIN_THROTTLE_WAIT);
                Outcome::Throttled {
                    after: Some(after),
                    class: "429",
                }
            }
            403 if self.kind == CallKind::Token || is_ban(resp) => {
                let until = Utc::now()
                    + chrono::Duration::from_std(self.ban_cooldown)
                        .unwrap_or_else(|_| chrono::Duration::minutes(30));
                Outcome::Suspend {
                    until,
                    class: "ban",
                    detail: format!(
                        "amoCRM answered 403 {} — the account or IP is probably banned for \
                         exceeding the rate limit; calls stop until {until}, ask amoCRM \
                         support to lift the block if it persists",
                        if !is_problem_json(resp) {
                            "with an HTML page"
                        } else if self.kind == CallKind::Token {
                            "on the token endpoint"
                        } else {
                            "saying the account is blocked"
                        }
                    ),
                }
            }
            401 if self.kind == CallKind::Token => Outcome::Fail {
                class: "401",
                detail: resp.text_snippet(),
            },
            401 => Outcome::Reauth,
            400 | 413 | 422 | 504 if self.kind == CallKind::BatchWrite => Outcome::Success,
            408 | 500..=599 => Outcome::Retry {
                after: parse_retry_after(&resp.headers, Utc::now()),
                class: status_class(status),
            },
            _ => Outcome::Fail {
                class: status_class(status),
                detail: resp.text_snippet(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;
    use reqwest::header::HeaderMap;

    fn answer_429(body: &str) -> ApiResponse {
        ApiResponse {
            connector: "amo".into(),
            endpoint: "GET companies",
            status: StatusCode::TOO_MANY_REQUESTS,
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
            json: serde_json::from_str(body).ok(),
        }
    }

    fn classify_429(body: &str) -> Outcome {
        AmoClassifier {
            kind: CallKind::Read,
            ban_cooldown: Duration::from_secs(60),
        }
        .classify(&answer_429(body))
    }

    fn answer_403(body: &str) -> Outcome {
        AmoClassifier {
            kind: CallKind::Read,
            ban_cooldown: Duration::from_secs(60),
        }
        .classify(&ApiResponse {
            status: StatusCode::FORBIDDEN,
            ..answer_429(body)
        })
    }

    #[test]
    fn a_json_403_is_a_ban_when_it_says_blocked_and_a_failure_otherwise() {
        let blocked = r#"{"title":"Forbidden","status":403,"detail":"Account is blocked"}"#;
        assert!(matches!(answer_403(blocked), Outcome::Suspend { .. }));
        let html = "<html><body><h1>403 Forbidden</h1></body></html>";
        assert!(matches!(answer_403(html), Outcome::Suspend { .. }));
        let denied = r#"{"title":"Forbidden","status":403,"detail":"Insufficient rights"}"#;
        assert!(matches!(answer_403(denied), Outcome::Fail { .. }));
    }

    #[test]
    fn a_429_with_an_unrepresentable_retry_after_waits_the_minimum_instead_of_panicking() {
        for body in [r#"{"retry_after": 1e30}"#, r#"{"retry_after": "1e30"}"#] {
            let outcome = classify_429(body);
            assert!(
                matches!(outcome, Outcome::Throttled { after: Some(a), .. } if a == MIN_THROTTLE_WAIT),
                "body {body} classified as {outcome:?}"
            );
        }
    }

    #[test]
    fn a_429_retry_after_in_the_body_is_the_wait() {
        let outcome = classify_429(r#"{"retry_after": 2.5}"#);
        assert!(
            matches!(outcome, Outcome::Throttled { after: Some(a), .. } if a == Duration::from_millis(2500)),
            "classified as {outcome:?}"
        );
    }
}
