//! Turning an HTTP answer into what the client should do with it. Vendors differ: Marketo
//! answers 200 with `success: false` and a code, amoCRM bans with an HTML 403. Each
//! connector supplies a [`Classifier`]; [`DefaultClassifier`] reads the HTTP status only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::ApiResponse;

/// What the client does with one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The answer is good: return it.
    Success,
    /// The vendor refused the call *before doing anything* (429, Marketo 606/615): safe
    /// to retry even for non-idempotent requests. `after` is the vendor's wait, if given.
    Throttled {
        /// How long the vendor asked us to wait.
        after: Option<Duration>,
        /// The class for metrics (`"429"`, `"606"`, `"615"`).
        class: &'static str,
    },
    /// A transient failure (5xx, Marketo 604/608/611/713) after which the request may have
    /// been partly applied: retried only when the request is idempotent.
    Retry {
        /// How long the vendor asked us to wait.
        after: Option<Duration>,
        /// The class for metrics (`"5xx"`, `"604"`, …).
        class: &'static str,
    },
    /// The token was rejected (401, Marketo 601/602): refresh and retry (twice at most in a
    /// row per call).
    Reauth,
    /// Stop calling this vendor until `until` (Marketo 607 daily quota, amoCRM ban):
    /// opens the client's circuit.
    Suspend {
        /// When calls may resume.
        until: DateTime<Utc>,
        /// The class (`"607"`, `"ban"`).
        class: &'static str,
        /// Why, for the alert (no secrets).
        detail: String,
    },
    /// A failure retrying will not fix.
    Fail {
        /// The class (`"400"`, `"404"`, `"1003"` …).
        class: &'static str,
        /// The vendor's reason.
        detail: String,
    },
}

/// Vendor-specific reading of answers.
pub trait Classifier: Send + Sync {
    /// Decides what to do with `resp`.
    fn classify(&self, resp: &ApiResponse) -> Outcome;
}

/// Classification by HTTP status: 2xx success; 401 reauth; 429 throttled; 408 and 5xx
/// retry; other statuses fail. `Retry-After` (seconds or HTTP date) is honoured.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl Classifier for DefaultClassifier {
    fn classify(&self, resp: &ApiResponse) -> Outcome {
        let status = resp.status.as_u16();
        let after = parse_retry_after(&resp.headers, Utc::now());
        match status {
            200..=299 => Outcome::Success,
            401 => Outcome::Reauth,
            429 => Outcome::Throttled {
                after,
                class: "429",
            },
            408 => Outcome::Retry {
                after,
                class: "408",
            },
            500..=599 => Outcome::Retry {
                after,
                class: status_class(status),
            },
            _ => Outcome::Fail {
                class: status_class(status),
                detail: resp.text_snippet(),
            },
        }
    }
}

/// A static label for an HTTP status, for metric keys (`"404"`, `"5xx"` for the rest).
pub fn status_class(status: u16) -> &'static str {
    const KNOWN: [&str; 16] = [
        "400", "401", "403", "404", "405", "408", "409", "413", "414", "415", "422", "429", "500",
        "502", "503", "504",
    ];
    let text = status.to_string();
    if let Some(k) = KNOWN.iter().find(|k| **k == text) {
        return k;
    }
    match status {
        500..=599 => "5xx",
        400..=499 => "4xx",
        300..=399 => "3xx",
        _ => "other",
    }
}

/// The `Retry-After` header as a wait from `now`: delta-seconds (`"120"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`; a date in the past means no wait).
pub fn parse_retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = raw.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = DateTime::parse_from_rfc2822(raw).ok()?.with_timezone(&Utc);
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            parse_retry_after(&headers("7"), Utc::now()),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn retry_after_http_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:30Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        assert_eq!(parse_retry_after(&headers("soon"), Utc::now()), None);
    }
}
