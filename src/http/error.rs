//! The errors of one HTTP call, each naming the connector and endpoint, none carrying a
//! secret, and their mapping onto the engine's [`ConnectorError`] classes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;

use crate::connector::ConnectorError;

/// Why a call through [`super::HttpClient::send`] failed.
///
/// `detail` fields are already redacted (see [`super::redact`]); endpoints are the static
/// labels connectors give (`"GET companies"`), never URLs with query strings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The vendor kept answering with a retryable status (429/5xx/606/…) until retries ran
    /// out, or a non-idempotent request met a failure after which it may have been applied.
    #[error("{connector} {endpoint}: temporary failure after {attempts} attempt(s): {detail}")]
    Transient {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// How many attempts were made.
        attempts: u32,
        /// The class of the last failure (`"429"`, `"606"`, `"5xx"`, `"connection"` …).
        class: &'static str,
        /// What happened last.
        detail: String,
        /// When the vendor asked us to come back, if it said.
        retry_after: Option<Duration>,
    },
    /// Credentials were rejected, even after one refresh, or could not be obtained.
    #[error("{connector} {endpoint}: authentication failed: {detail}")]
    Auth {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// What failed (never the secret).
        detail: String,
    },
    /// Calls are suspended until `until`: a vendor ban or exhausted quota (circuit open),
    /// or our own daily budget is spent.
    #[error("{connector} {endpoint}: suspended until {until} ({class}): {detail}")]
    Suspended {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// When calls may resume.
        until: DateTime<Utc>,
        /// The class (`"607"`, `"ban"`, `"daily_budget"` …).
        class: &'static str,
        /// Why.
        detail: String,
    },
    /// The vendor refused the call for a reason retrying will not fix.
    #[error("{connector} {endpoint}: rejected with HTTP {status} ({class}): {detail}")]
    Rejected {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// The HTTP status (vendors like Marketo reject with 200).
        status: StatusCode,
        /// The class given by the classifier.
        class: &'static str,
        /// The vendor's reason, redacted and truncated.
        detail: String,
    },
    /// No complete answer within the configured timeout.
    #[error("{connector} {endpoint}: timed out after {timeout:?} ({attempts} attempt(s))")]
    Timeout {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// The per-call timeout that expired.
        timeout: Duration,
        /// How many attempts were made.
        attempts: u32,
        /// True if the request may have reached the server (so a write may have landed).
        maybe_applied: bool,
    },
    /// The connection failed.
    #[error("{connector} {endpoint}: connection failed: {detail}")]
    Connection {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// What failed.
        detail: String,
        /// True if the request may have reached the server (reset after sending).
        maybe_applied: bool,
    },
    /// The answer could not be read or parsed.
    #[error("{connector} {endpoint}: could not decode the response: {detail}")]
    Decode {
        /// The connector.
        connector: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The client or request is misconfigured.
    #[error("{connector}: invalid HTTP configuration: {detail}")]
    Config {
        /// The connector.
        connector: String,
        /// What is wrong.
        detail: String,
    },
}

impl HttpError {
    /// The connector the error belongs to.
    pub fn connector(&self) -> &str {
        match self {
            HttpError::Transient { connector, .. }
            | HttpError::Auth { connector, .. }
            | HttpError::Suspended { connector, .. }
            | HttpError::Rejected { connector, .. }
            | HttpError::Timeout { connector, .. }
            | HttpError::Connection { connector, .. }
            | HttpError::Decode { connector, .. }
            | HttpError::Config { connector, .. } => connector,
        }
    }

    /// A short class for metrics and logs (`"timeout"`, `"auth"`, …).
    pub fn class(&self) -> &'static str {
        match self {
            HttpError::Transient { class, .. } => class,
            HttpError::Auth { .. } => "auth",
            HttpError::Suspended { class, .. } => class,
            HttpError::Rejected { class, .. } => class,
            HttpError::Timeout { .. } => "timeout",
            HttpError::Connection { .. } => "connection",
            HttpError::Decode { .. } => "decode",
            HttpError::Config { .. } => "config",
        }
    }

    /// True if the call may have been carried out although it failed: the request may
    /// have reached the server before a timeout or dropped connection, a 5xx may come
    /// after the work was done, or a success answer could not be read. Throttling,
    /// refusals and suspensions are not: the vendor did nothing.
    pub fn may_have_applied(&self) -> bool {
        match self {
            HttpError::Timeout { maybe_applied, .. }
            | HttpError::Connection { maybe_applied, .. } => *maybe_applied,
            // Only throttling is known to leave nothing done; any other status may come
            // after the work (a 502/504 from a proxy, a 500 while answering).
            HttpError::Transient { class, .. } => {
                !matches!(*class, "429" | "606" | "615" | "607" | "daily_budget")
            }
            HttpError::Decode { .. } => true,
            HttpError::Auth { .. }
            | HttpError::Suspended { .. }
            | HttpError::Rejected { .. }
            | HttpError::Config { .. } => false,
        }
    }

    /// True if trying the same call in a later cycle may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Transient { .. }
                | HttpError::Timeout { .. }
                | HttpError::Connection { .. }
                | HttpError::Decode { .. }
        )
    }
}

impl From<HttpError> for ConnectorError {
    fn from(e: HttpError) -> Self {
        let connector = e.connector().to_string();
        let detail = e.to_string();
        match e {
            HttpError::Transient { retry_after, .. } => ConnectorError::Transient {
                connector,
                detail,
                retry_after,
            },
            HttpError::Timeout { .. } | HttpError::Connection { .. } | HttpError::Decode { .. } => {
                ConnectorError::Transient {
                    connector,
                    detail,
                    retry_after: None,
                }
            }
            // `ConnectorError::Auth` says "authentication failed" and names the connector.
            HttpError::Auth {
                endpoint,
                detail: why,
                ..
            } => ConnectorError::Auth {
                connector,
                detail: format!("{endpoint}: {why}"),
            },
            HttpError::Suspended { until, .. } => ConnectorError::Suspended {
                connector,
                detail,
                until,
            },
            HttpError::Rejected { .. } | HttpError::Config { .. } => {
                ConnectorError::Fatal { connector, detail }
            }
        }
    }
}
