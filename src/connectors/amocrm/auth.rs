//! amoCRM OAuth with rotating refresh tokens: a [`TokenSource`] for the shared
//! [`BearerAuth`](crate::http::BearerAuth), which runs it single-flight. Each refresh
//! answers a NEW refresh token and kills the old one as soon as the new one is used, so
//! the new pair is written to the store and committed before it is returned (and hence
//! before any request uses it). A crash after the vendor answered but before the commit
//! loses nothing: the old refresh token keeps working until the new one is first used.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Value, json};
use url::Url;

use super::classify::{AmoClassifier, CallKind};
use crate::http::{ApiRequest, HttpClient, HttpError, Token, TokenSource};
use crate::secret::Secret;
use crate::store::{Store, TokenRecord};

/// A stored access token is reused at start only if it has at least this long to live.
const MIN_REUSE_LEFT: Duration = Duration::from_secs(600);

/// Refreshes amoCRM tokens with `grant_type=refresh_token` and persists every new pair.
pub struct AmoTokenSource {
    pub(crate) connector: String,
    pub(crate) client: HttpClient,
    pub(crate) token_url: Url,
    pub(crate) client_id: Secret,
    pub(crate) client_secret: Secret,
    pub(crate) redirect_uri: String,
    /// The refresh token from the config: used only while the store has none.
    pub(crate) initial_refresh: Secret,
    pub(crate) store: Arc<Store>,
    pub(crate) ban_cooldown: Duration,
}

impl std::fmt::Debug for AmoTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmoTokenSource")
            .field("connector", &self.connector)
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

impl AmoTokenSource {
    fn auth_err(&self, detail: String) -> HttpError {
        HttpError::Auth {
            connector: self.connector.clone(),
            endpoint: "POST oauth2/access_token",
            detail,
        }
    }

    fn stored(&self) -> Result<Option<TokenRecord>, HttpError> {
        self.store
            .begin_read()
            .and_then(|tx| tx.token(&self.connector))
            .map_err(|e| self.auth_err(format!("cannot read the stored OAuth tokens: {e}")))
    }

    fn persist(&self, rec: &TokenRecord) -> Result<(), HttpError> {
        self.store
            .begin_write()
            .and_then(|tx| {
                tx.put_token(&self.connector, rec)?;
                tx.commit()
            })
            .map_err(|e| {
                self.auth_err(format!(
                    "cannot persist the rotated OAuth tokens (not used, the previous refresh \
                     token stays valid): {e}"
                ))
            })
    }

    fn token_of(rec: &TokenRecord) -> Token {
        let left = rec
            .expires_at
            .and_then(|at| (at - Utc::now()).to_std().ok());
        Token {
            access: Secret::new(rec.access_token.clone()),
            expires_at: rec
                .expires_at
                .map(|_| Instant::now() + left.unwrap_or_default()),
        }
    }
}

#[async_trait]
impl TokenSource for AmoTokenSource {
    async fn fetch(&self, rejected: Option<&Token>) -> Result<Token, HttpError> {
        let stored = self.stored()?;
        // After a restart the stored access token may still be good: no need to rotate.
        if rejected.is_none()
            && let Some(rec) = &stored
            && !rec.access_token.is_empty()
            && rec
                .expires_at
                .is_some_and(|at| (at - Utc::now()).to_std().is_ok_and(|l| l > MIN_REUSE_LEFT))
        {
            return Ok(Self::token_of(rec));
        }
        let refresh = stored
            .as_ref()
            .and_then(|r| r.refresh_token.clone())
            .map(Secret::new)
            .unwrap_or_else(|| self.initial_refresh.clone());
        let body = json!({
            "client_id": self.client_id.expose(),
            "client_secret": self.client_secret.expose(),
            "grant_type": "refresh_token",
            "refresh_token": refresh.expose(),
            "redirect_uri": self.redirect_uri,
        });
        // Repeating a refresh is safe: until the new refresh token is used, the old one
        // still works, so a lost answer is recovered by asking again.
        let req = ApiRequest::post("POST oauth2/access_token", self.token_url.clone())
            .json(body)
            .idempotent(true);
        let classify = AmoClassifier {
            kind: CallKind::Token,
            ban_cooldown: self.ban_cooldown,
        };
        let resp = match self.client.send(req, &classify).await {
            Ok(r) => r,
            Err(HttpError::Rejected { status, detail, .. }) => {
                let revoked = status.as_u16() == 401;
                tracing::error!(
                    connector = %self.connector,
                    status = status.as_u16(),
                    "amoCRM refused the refresh token: the integration must be re-authorised"
                );
                return Err(self.auth_err(format!(
                    "the refresh token was refused (HTTP {status}{}): {detail}; re-authorise \
                     the integration in amoCRM (authorization_code grant) and configure the \
                     new refresh token",
                    if revoked { ", revoked or invalid" } else { "" }
                )));
            }
            Err(e) => return Err(e),
        };
        let v = resp.json_value()?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let (Some(access), Some(new_refresh)) = (text("access_token"), text("refresh_token"))
        else {
            return Err(
                self.auth_err("the token answer lacks access_token or refresh_token".into())
            );
        };
        let expires_in = v
            .get("expires_in")
            .and_then(|n| n.as_u64().or_else(|| n.as_str()?.parse().ok()))
            .unwrap_or(86_400);
        let rec = TokenRecord {
            access_token: access.to_string(),
            refresh_token: Some(new_refresh.to_string()),
            expires_at: Some(Utc::now() + chrono::Duration::seconds(expires_in as i64)),
        };
        // Durable before use: losing the newest refresh token locks the integration out.
        self.persist(&rec)?;
        tracing::info!(connector = %self.connector, expires_in, "amoCRM tokens refreshed and stored");
        Ok(Token::new(
            Secret::new(rec.access_token),
            Some(Duration::from_secs(expires_in)),
        ))
    }
}
