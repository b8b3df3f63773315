//! The amoCRM connector (API v4 companies).
//!
//! # Auth
//! A private integration's long-lived token is sent as a static bearer. OAuth uses
//! [`auth::AmoTokenSource`] behind the shared single-flight `BearerAuth`: the refresh
//! token in use is the store's (`Store::token`) if any, else the config's initial one;
//! every refresh rotates it, and the new pair is committed to the store before it is
//! used. Tokens are refreshed 10 minutes ahead of their 24 h expiry and once after a 401.
//! A refused refresh token ends in an `Auth` error asking for re-authorisation.
//!
//! # Reading changes (cursor scheme)
//! The cursor is `(ts, ids)`: every company updated before second `ts` has been returned,
//! and of those updated *at* `ts`, the ids listed. Each poll cycle fixes its upper bound
//! when it starts at the last whole second that ended at least 300 ms before (amoCRM
//! stamps whole seconds, so a second that is over can gain no more writes; the 300 ms
//! let a write stamped at its very end be stored, and cover a server clock slightly behind
//! ours) and keeps it in the cursor until the cycle ends. Cycles are timed to begin just
//! after that point.
//!
//! With API filtering (`GET /api/v4/account?with=is_api_filter_enabled`) each call is
//! `filter[updated_at][from]=ts&filter[updated_at][to]=upper+1&order[updated_at]=asc&
//! limit=250&page=1`: keyset paging, always page 1, dropping records at or before the
//! cursor. `to` is one past the bound, so that a server reading it as exclusive still
//! lists `upper`; rows after `upper` are dropped, and one of them ends the cycle (the list
//! is ascending). Likewise `from` (undocumented too): until the server has listed a row
//! updated exactly at `from`, calls send `from = ts − 1` (rows before `ts` are dropped),
//! so a server reading `from` as exclusive still lists second `ts`; the first such row
//! proves `from` inclusive, that call is made again with `from = ts`, and all later ones
//! are. Page numbers are never trusted over a changing set. A page that is full
//! and entirely inside one second `S` (more than 250 records share `S`, e.g. a bulk
//! import) switches to the exact-second procedure: `from=S, to=S+1`, pages 1..n (a row
//! after `S` ends the pass), then the whole second again until a pass finds no unseen id
//! and lists as many rows of `S` as the pass before (records can only *leave* a past
//! second, so such a pass lost nothing to a page shift); the cursor then moves to `S + 1`.
//! "Full" means 250 rows, or fewer with a `_links.next` (a server capping pages below the
//! `limit` asked for); a short page so linked goes on only while it brings unseen records.
//! A 204 or a short page ends the cycle and the cursor moves to `upper + 1`. Steady state costs one call per cycle; a full read costs about
//! `N / 250` calls, plus `2 × ceil(k / 250)` for each second holding `k > 250` records.
//!
//! Without API filtering the fallback scans `order[updated_at]=desc` page by page until
//! it meets records older than the cursor, skipping records newer than the cycle's upper
//! bound. A full read costs `N / 250` calls and so does every cycle after a burst of
//! changes as deep as the scan goes. A record updated mid-scan moves to the front of the
//! list: the rows behind it shift one place back (read twice, never skipped) and the
//! record itself is read next cycle, since its new time is past the fixed upper bound.
//! A company *deleted* in the UI mid-scan shifts later rows one place forward, so the
//! fallback can miss one row per such deletion at a page boundary; only filtering closes
//! that gap. Deletions themselves are not reported.
//!
//! # Flat keys
//! `name`, `responsible_user_id`, `tags` and, for every custom field, `cf.id.<id>`,
//! `cf.code.<CODE>` (fields with a code) and `cf.name.<name>` carrying the first value as
//! amoCRM sent it (numbers stay the vendor's text). Catalogue fields absent from a record
//! are JSON null, so a cleared field is visible.
//!
//! # Writing
//! Items with a vendor id go to `PATCH /api/v4/companies`, the others to `POST`, with
//! minimal bodies and `request_id` = the item's index. A multitext field (phone, e-mail)
//! is synced by its first value; since a write replaces all of a field's values, updates
//! that write one first read the companies' current values (`filter[id][]`, 250 a call;
//! by id without API filtering) and carry the others along (`multitext.rs`). A 400 `validation-errors` stores
//! nothing: the named items are `Rejected` with amoCRM's reason and the rest are sent
//! again. 413/422 and a PATCH 504 halve the batch. A POST cannot be repeated safely (two
//! identical POSTs make two companies): after a lost answer, a 5xx or a 504 the items come
//! back as `Unconfirmed` (after a throttle or a validation refusal, which store nothing, as
//! `Retry`). An item replayed with `unconfirmed_since` and no vendor id is first looked for
//! (`replay.rs`): the replays of a push are resolved together by reading companies newest
//! first (`order[created_at]=desc`, 250 a page) until all are found or companies created
//! before `unconfirmed_since` less 5 minutes for clock skew appear (then the rest were
//! never created); only when that scan is inconclusive (40 pages, or a list not in that
//! order) is each remaining one searched (`GET /api/v4/companies?query=…`). A match is an exact one on the normalised
//! "Domain" field, or on the name when the item has no domain; found companies are updated.
//! Residual risk: a company created by a lost POST that someone renamed or re-domained in
//! between, or that amoCRM's search does not return yet, is created a second time.
//!
//! # Limits
//! 7 calls/s by default (the shared limiter), 429s (JSON or HTML, with or without
//! `Retry-After`) are waited out for at least 1 s, and a 403 that is not a JSON
//! permission problem (an HTML page, or JSON saying the account is blocked) — or any
//! 403 from the token endpoint — is a ban: the circuit opens for [`DEFAULT_BAN_COOLDOWN`]
//! with a loud log, and nothing is retried.

pub mod auth;
pub mod classify;
mod multitext;
pub mod poll;
pub mod push;
mod replay;
pub mod wire;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use url::Url;

use crate::config::{AmoAuth, AmocrmConfig};
use crate::connector::{Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome};
use crate::connectors::BuildContext;
use crate::connectors::shared::http_client;
use crate::http::{
    ApiRequest, AuthProvider, BearerAuth, HttpClient, HttpError, QuotaReset, StaticHeaderAuth,
};
use crate::mapping::split_enum_suffix;

use auth::AmoTokenSource;
use classify::{AmoClassifier, CallKind};
use wire::{Catalogue, CustomField, ParsedPage};

/// How long calls stop after a ban (403 HTML): amoCRM lifts bans by hand or after a while.
pub const DEFAULT_BAN_COOLDOWN: Duration = Duration::from_secs(30 * 60);
/// Tokens are renewed when less than this is left of their life.
const REFRESH_AHEAD: Duration = Duration::from_secs(600);

/// The amoCRM connector.
pub struct AmocrmConnector {
    name: String,
    base_url: Url,
    client: HttpClient,
    auth: Arc<dyn AuthProvider>,
    batch_size: usize,
    ban_cooldown: Duration,
    /// Creates per POST; halved after a POST 504 (never above `batch_size`).
    create_batch_limit: AtomicUsize,
    catalogue: RwLock<Option<Arc<Catalogue>>>,
    filter_enabled: AtomicBool,
    /// Whether the server has been seen to list rows updated exactly at
    /// `filter[updated_at][from]` (see `poll::list_from`).
    from_inclusive: AtomicBool,
}

impl std::fmt::Debug for AmocrmConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmocrmConnector")
            .field("name", &self.name)
            .field("base_url", &self.base_url.as_str())
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

fn fatal(name: &str, detail: String) -> ConnectorError {
    ConnectorError::Fatal {
        connector: name.to_string(),
        detail,
    }
}

impl AmocrmConnector {
    /// Builds the connector: resolves secrets, builds the HTTP client (7 calls/s by
    /// default, UTC quota day) and the auth provider. No call is made before `start`.
    pub fn new(name: &str, cfg: &AmocrmConfig, ctx: &BuildContext) -> Result<Self, ConnectorError> {
        let client = http_client(name, &cfg.common, QuotaReset::UtcMidnight, &ctx.store)?;
        let base_url = cfg.common.base_url.clone();
        let secret = |r: &crate::config::SecretRef, what: &str| {
            r.resolve()
                .map_err(|e| fatal(name, format!("cannot read the amoCRM {what}: {e}")))
        };
        let ban_cooldown = DEFAULT_BAN_COOLDOWN;
        let auth: Arc<dyn AuthProvider> = match &cfg.auth {
            AmoAuth::LongLived { token } => {
                let token = secret(token, "long-lived token")?;
                Arc::new(StaticHeaderAuth::bearer(name, &token)?)
            }
            AmoAuth::OAuth {
                client_id,
                client_secret,
                redirect_uri,
                refresh_token,
            } => {
                let source = AmoTokenSource {
                    connector: name.to_string(),
                    client: client.clone(),
                    token_url: base_url
                        .join("oauth2/access_token")
                        .map_err(|e| fatal(name, format!("bad base_url: {e}")))?,
                    client_id: secret(client_id, "client_id")?,
                    client_secret: secret(client_secret, "client_secret")?,
                    redirect_uri: redirect_uri.clone(),
                    initial_refresh: secret(refresh_token, "refresh_token")?,
                    store: ctx.store.clone(),
                    ban_cooldown,
                };
                Arc::new(BearerAuth::new(name, source, REFRESH_AHEAD))
            }
        };
        let batch_size = cfg.common.batch_size.clamp(1, 250);
        Ok(AmocrmConnector {
            name: name.to_string(),
            base_url,
            client,
            auth,
            batch_size,
            ban_cooldown,
            create_batch_limit: AtomicUsize::new(batch_size),
            catalogue: RwLock::new(None),
            filter_enabled: AtomicBool::new(false),
            from_inclusive: AtomicBool::new(false),
        })
    }

    /// The HTTP client (metrics, circuit state).
    pub fn http(&self) -> &HttpClient {
        &self.client
    }

    /// Whether `start` found API filtering enabled on the account.
    pub fn filter_enabled(&self) -> bool {
        self.filter_enabled.load(Ordering::Relaxed)
    }

    /// The custom field catalogue loaded by `start` (empty before).
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.catalogue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    fn url(&self, path: &str) -> Url {
        self.base_url
            .join(path)
            .expect("a relative path joins onto a base URL")
    }

    fn read_classifier(&self) -> AmoClassifier {
        AmoClassifier {
            kind: CallKind::Read,
            ban_cooldown: self.ban_cooldown,
        }
    }

    /// One GET; `None` for 204 or an empty body (amoCRM's "nothing").
    async fn fetch(
        &self,
        endpoint: &'static str,
        path: &str,
        params: Vec<(String, String)>,
    ) -> Result<Option<Value>, HttpError> {
        let mut req = ApiRequest::get(endpoint, self.url(path)).auth(self.auth.clone());
        req.query = params;
        let resp = self.client.send(req, &self.read_classifier()).await?;
        if resp.status.as_u16() == 204 || resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Ok(Some(resp.json_value()?.clone()))
    }

    async fn get(
        &self,
        endpoint: &'static str,
        path: &str,
        params: Vec<(String, String)>,
    ) -> Result<Option<Value>, ConnectorError> {
        Ok(self.fetch(endpoint, path, params).await?)
    }

    /// [`Self::get`] for an endpoint outside the companies API proper: an answer of 404
    /// or 405 (a server without it) is logged and taken as no content.
    async fn get_optional(
        &self,
        endpoint: &'static str,
        path: &str,
        params: Vec<(String, String)>,
    ) -> Result<Option<Value>, ConnectorError> {
        match self.fetch(endpoint, path, params).await {
            Err(HttpError::Rejected { status, .. }) if matches!(status.as_u16(), 404 | 405) => {
                tracing::warn!(connector = %self.name, endpoint, status = status.as_u16(), "endpoint not available on this server; going on without it");
                Ok(None)
            }
            other => Ok(other?),
        }
    }

    /// One list call; `None` for 204 (amoCRM's empty list).
    async fn list(
        &self,
        params: Vec<(String, String)>,
    ) -> Result<Option<ParsedPage>, ConnectorError> {
        let Some(v) = self
            .get("GET companies", "api/v4/companies", params)
            .await?
        else {
            return Ok(None);
        };
        let catalogue = self.catalogue();
        wire::parse_company_page(&v, &catalogue)
            .map(Some)
            .map_err(|detail| ConnectorError::Transient {
                connector: self.name.clone(),
                detail: format!("GET companies: {detail}"),
                retry_after: None,
            })
    }

    /// Loads every page of the company custom field catalogue.
    async fn load_catalogue(&self) -> Result<Catalogue, ConnectorError> {
        let mut fields: Vec<CustomField> = Vec::new();
        for page in 1u32.. {
            let params = vec![
                ("limit".to_string(), "250".to_string()),
                ("page".to_string(), page.to_string()),
            ];
            // No catalogue endpoint (404/405) is an account without custom fields: the
            // rules mapped to them are dropped with a warning, the standard ones work.
            let Some(v) = self
                .get_optional(
                    "GET companies/custom_fields",
                    "api/v4/companies/custom_fields",
                    params,
                )
                .await?
            else {
                break;
            };
            let list = v
                .get("_embedded")
                .and_then(|e| e.get("custom_fields"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            fields.extend(list.iter().filter_map(CustomField::from_json));
            let has_next = v
                .get("_links")
                .and_then(|l| l.get("next"))
                .is_some_and(|n| !n.is_null());
            if list.is_empty() || !has_next {
                break;
            }
        }
        Ok(Catalogue::new(fields))
    }

    async fn ensure_started(&self) -> Result<(), ConnectorError> {
        let loaded = self
            .catalogue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if loaded { Ok(()) } else { self.start().await }
    }
}

#[async_trait]
impl Connector for AmocrmConnector {
    fn http_metrics(&self) -> Option<crate::http::HttpMetrics> {
        Some(self.http().metrics())
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn start(&self) -> Result<(), ConnectorError> {
        let account = self
            .get_optional(
                "GET account",
                "api/v4/account",
                vec![("with".into(), "is_api_filter_enabled".into())],
            )
            .await?;
        // An account endpoint the server does not have (404/405) says nothing about
        // filtering: the descending scan is correct either way, so it is the safe choice.
        let enabled = account
            .as_ref()
            .and_then(|a| a.get("is_api_filter_enabled"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !enabled {
            tracing::warn!(connector = %self.name, "amoCRM API filtering is off for this account: polling scans by updated_at descending (costlier, see docs)");
        }
        self.filter_enabled.store(enabled, Ordering::Relaxed);
        let catalogue = self.load_catalogue().await?;
        tracing::info!(connector = %self.name, fields = catalogue.fields().len(), filter = enabled, "amoCRM connector started");
        *self.catalogue.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(catalogue));
        Ok(())
    }

    fn unavailable_fields(&self, vendor_keys: &[String]) -> Vec<String> {
        let catalogue = self.catalogue();
        vendor_keys
            .iter()
            .filter(|k| {
                let (base, _) = split_enum_suffix(k);
                base.starts_with("cf.") && catalogue.resolve(base).is_none()
            })
            .cloned()
            .collect()
    }

    fn unholdable(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, String)> {
        // Custom fields only (the name is never left out): each alone, as the write would
        // build it; what fails is what the account cannot hold (a select's missing option,
        // text in a numeric field).
        let catalogue = self.catalogue();
        fields
            .iter()
            .filter(|(k, _)| {
                k.starts_with("cf.") && catalogue.resolve(split_enum_suffix(k).0).is_some()
            })
            .filter_map(|(k, v)| {
                let one = serde_json::Map::from_iter([(k.clone(), v.clone())]);
                push::build_body(&one, &catalogue)
                    .err()
                    .map(|reason| (k.clone(), reason))
            })
            .collect()
    }

    fn stored_as(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, serde_json::Value)> {
        let catalogue = self.catalogue();
        fields
            .iter()
            .filter(|(k, _)| k.starts_with("cf."))
            .filter_map(|(k, v)| {
                let field = catalogue.resolve(split_enum_suffix(k).0)?;
                push::stored_form(field, v).map(|stored| (k.clone(), stored))
            })
            .collect()
    }

    async fn poll(&self, cursor: &Cursor, mode: &PollMode) -> Result<Page, ConnectorError> {
        self.ensure_started().await?;
        self.poll_step(cursor, mode).await
    }

    fn poll_phase(&self) -> Option<std::time::Duration> {
        // A cycle reads the seconds that are over (`updated_at` has whole seconds) and
        // have settled: begun just after that, it reads a change of the second before
        // at once.
        Some(poll::SETTLE + std::time::Duration::from_millis(20))
    }

    fn updates_are_partial(&self) -> bool {
        // `PATCH` changes the keys and custom fields it names, nothing else.
        true
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    fn max_in_flight(&self) -> usize {
        self.client.config().max_concurrent
    }

    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        self.ensure_started().await?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.push_items(items).await
    }
}
