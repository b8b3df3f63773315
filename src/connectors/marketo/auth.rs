//! Marketo's OAuth client-credentials tokens: a [`TokenSource`] for `GET
//! /identity/oauth/token`, sent through its own unlimited [`HttpClient`] because identity
//! calls count against neither Marketo's rate window nor its daily quota — so they must not
//! spend our limiter slots or daily budget either. Wrapped in [`crate::http::BearerAuth`],
//! which caches the token, renews it when less than a minute is left and single-flights
//! refreshes after 601/602.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use url::Url;

use super::wire::MarketoClassifier;
use crate::http::{
    ApiRequest, HttpClient, HttpConfig, HttpError, MemoryQuotaLedger, RateLimit, Token, TokenSource,
};
use crate::secret::Secret;

/// Fetches access tokens with the LaunchPoint client id and secret.
pub struct MarketoTokenSource {
    connector: String,
    url: Url,
    client_id: Secret,
    client_secret: Secret,
    http: HttpClient,
    fetches: AtomicU64,
}

impl MarketoTokenSource {
    /// A source for the instance at `root` (ending in `/`).
    pub fn new(
        connector: &str,
        root: &Url,
        client_id: Secret,
        client_secret: Secret,
        timeouts: (Duration, Duration),
    ) -> Result<Self, HttpError> {
        let url = root
            .join("identity/oauth/token")
            .map_err(|e| HttpError::Config {
                connector: connector.to_string(),
                detail: format!("cannot build the identity URL: {e}"),
            })?;
        let cfg = HttpConfig {
            rate: RateLimit::Unlimited,
            max_concurrent: 2,
            daily_budget: None,
            connect_timeout: timeouts.0,
            read_timeout: timeouts.1,
            max_retries: 3,
            ..HttpConfig::new(&format!("{connector}/identity"))
        };
        let http = HttpClient::new(cfg, Arc::new(MemoryQuotaLedger::new()))?;
        Ok(MarketoTokenSource {
            connector: connector.to_string(),
            url,
            client_id,
            client_secret,
            http,
            fetches: AtomicU64::new(0),
        })
    }

    /// How many tokens were fetched so far (tests, status).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for MarketoTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarketoTokenSource")
            .field("connector", &self.connector)
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TokenSource for MarketoTokenSource {
    async fn fetch(&self, _rejected: Option<&Token>) -> Result<Token, HttpError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let req = ApiRequest::get("GET identity/oauth/token", self.url.clone())
            .query("grant_type", "client_credentials")
            .query("client_id", self.client_id.expose())
            .query("client_secret", self.client_secret.expose());
        let resp = self
            .http
            .send(req, &MarketoClassifier::default())
            .await
            .map_err(|e| match e {
                HttpError::Rejected { status, detail, .. } => HttpError::Auth {
                    connector: self.connector.clone(),
                    endpoint: "GET identity/oauth/token",
                    detail: format!("the identity service refused the client credentials (HTTP {status}): {detail}"),
                },
                other => other,
            })?;
        let body = resp.json_value()?;
        let bad = |what: &str| HttpError::Auth {
            connector: self.connector.clone(),
            endpoint: "GET identity/oauth/token",
            detail: format!("the identity answer has no usable {what}"),
        };
        let access = body
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("access_token"))?;
        let expires_in = match body.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        Ok(Token::new(
            Secret::new(access.to_string()),
            expires_in.map(Duration::from_secs),
        ))
    }
}
