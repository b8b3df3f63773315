//! The Marketo connector: reads companies by scanning id ranges (Marketo has no time filter
//! on companies) paced within a share of the instance's daily quota, and writes them with
//! sync calls keyed so that every replay is idempotent.
//!
//! # Calls and limits
//! Every REST call goes through one [`HttpClient`] built from the connector config: 100
//! calls per rolling 20 s, 10 in flight, and a daily budget of `daily_quota × daily_share`
//! counted per US-Central quota day. Identity calls (`GET /identity/oauth/token`) count
//! against none of Marketo's limits and go through a separate unlimited client, so they
//! never spend a rate slot or budget. The token is cached until less than 60 s of it is
//! left and refreshed single-flight after 601/602 ([`crate::http::BearerAuth`]).
//! [`wire::MarketoClassifier`] reads Marketo's HTTP-200 `success: false` bodies: 606/615 →
//! throttled (a pause, then retry), 604/608/611/713 → retry, 607 → no calls until the next
//! US-Central midnight (logged as an error), everything else fails with the vendor's reason.
//!
//! # Change detection: the id-range scan
//! Company ids are integers handed out in increasing order; `id` is a searchable field.
//! A *cycle* queries `filterType=id` with 300 consecutive ids per call (`GET
//! companies.json`; 300 ids make a URL of 2–3 KB, within Marketo's 8 KB — an instance that
//! answers 414 is queried as `POST …?_method=GET` with a form body from then on), from the
//! lowest id ever seen upwards, asking for explicit `fields=` (the standard company fields
//! and the mapped keys, intersected with what `describe` reported), following
//! `nextPageToken` if one comes back (an instance answering "1013 Object not found" for
//! a window without companies is read as an empty window). It emits every company whose
//! `updatedAt` is at or after `since − overlap` (5 min by default, for clock skew between
//! us and Marketo) and
//! keeps going past the highest id it knows until 2 consecutive windows are empty, which
//! discovers companies created since. At the end of a cycle `since` becomes the time the
//! cycle *began* (minus 2 s: `updatedAt` has whole seconds), so a change made during a
//! cycle, behind the scan position, is read by the next one. The cursor (stored with each
//! page) is [`poll::ScanCursor`]:
//! `{"scan_from", "cycle_start", "began_at", "since", "max_id", "min_id", "empty_run",
//! "cycle_calls", "not_before", "probed", "descend_from", "descend_empty",
//! "hint_tried"}`. The first cycle emits everything. A first discovery starts at id 1;
//! after 40 empty windows with nothing found at all it *probes* one window at each round
//! id an instance may start its sequence at ([`poll::PROBE_IDS`]: 20,000, 50,000,
//! 100,000, … 2·10⁹) and at the lowest id a push of ours was answered with (after a
//! restart: the lowest id the store links), lowest first, up to the first hit. From there
//! the cycle goes on upwards, and a *descent* then reads the windows below it until 40
//! empty ones in a row (or id 1): an instance whose ids begin at 99,900 or 1,000,001 is
//! found in full. Whatever a probe or a descent finds is emitted whatever its `updatedAt`
//! (none of it was seen before).
//! `PollMode::Full { since }` runs one cycle emitting everything updated since `since`.
//!
//! **Cost**: `ceil((max_id − min_id + 1) / 300) + 2` calls per cycle (one more per page
//! beyond the first, which 300-id windows never need). For 10,000 companies with dense ids:
//! 34 + 2 = 36 calls; for 100,000: 336. Holes left by deletions still cost their windows.
//!
//! **Pacing**: a cycle that made `c` calls sets `not_before = began_at + 24 h × c / R`
//! where `R = daily budget × 0.5` (half of this daemon's budget is for reads, half for
//! writes). Until then an incremental poll returns an empty page, `more: false`, and the
//! cursor unchanged, making no call. With Marketo's defaults (50,000 × 0.5 share → R =
//! 12,500) a 10k-company cycle may start every ~4 min, a 100k one every ~39 min. The daily
//! budget itself is enforced by the HTTP client: spent → `Suspended` until the reset.
//!
//! An empty instance therefore costs 40 + 16 calls per cycle (paced like any other) —
//! except that once a push of ours has been answered with an id while no company was
//! found yet, the next cycle starts at once instead of after its pause (once per such id),
//! so companies we create in an empty instance are scanned from the start.
//! **What it sees**: every company, including companies without leads (Adobe's
//! lead-activity route misses those, and its history is pruned after 90 days); creations
//! and updates, with a latency of one cycle period. **What it cannot see**: deletions
//! (a deleted id just leaves a hole; we never infer deletes), and companies created behind
//! a run of more than 600 consecutive ids that were all created and deleted between two
//! cycles (raise [`MarketoOptions::empty_windows_to_stop`] on such instances).
//!
//! # Writes
//! `push` sends one sync call per keying mode (≤ 300 records each):
//! - items with a `vendor_id` (linked): `updateOnly` by `idField` with `id` — works for
//!   companies created in Marketo without an `externalCompanyId`, and never tries to
//!   change `externalCompanyId`, which Marketo forbids after creation (it is not sent);
//! - items without one: `createOrUpdate` by `dedupeFields` (`externalCompanyId`); an item
//!   without `externalCompanyId` gets its `canonical_id` as one. That key is stable, so a
//!   call whose outcome is unknown (timeout) is safe to repeat: the replay updates what
//!   the first attempt created. Both modes are therefore marked idempotent.
//!
//! Only fields `describe` lists as updateable are sent (an unknown field would skip the
//! record with 1006). Per-record results: `created`/`updated` → `Written`; `skipped` →
//! `Rejected` with Marketo's `code: message`, except transient codes and 1036 (the same
//! key twice in one batch) → `Retry`. HTTP 413/414 halve the batch until it fits.
//!
//! # Flat keys
//! Company API field names as `describe` reports them (`company`, `website`, `mainPhone`,
//! `numberOfEmployees`, `annualRevenue`, `billing*`, `externalCompanyId`, `sicCode`, custom
//! fields), plus `id`, `createdAt`, `updatedAt` on read.

pub mod auth;
pub mod poll;
pub mod push;
pub mod wire;

#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use url::Url;

use self::auth::MarketoTokenSource;
use self::wire::{Describe, MarketoClassifier};
use super::BuildContext;
use crate::config::{CommonConnectorConfig, MarketoConfig};
use crate::connector::{
    Connector, ConnectorError, Cursor, Page, PollMode, PreWriteRead, PushItem, PushOutcome,
};
use crate::http::{ApiRequest, BearerAuth, HttpClient, HttpMetrics, QuotaReset};
use crate::secret::Secret;

/// Tuning of the scan and of throttling pauses; [`Default`] is right for real instances.
#[derive(Debug, Clone)]
pub struct MarketoOptions {
    /// Consecutive empty 300-id windows above the highest known id that end a cycle.
    pub empty_windows_to_stop: u32,
    /// Empty windows after which a scan that has found no company at all gives up.
    pub discovery_windows: u32,
    /// Where a first discovery starts.
    pub first_id: i64,
    /// Windows queried concurrently per poll (each is one call).
    pub windows_per_poll: u32,
    /// Share of the daily budget that scans may use; pushes get the rest.
    pub read_share: f64,
    /// Subtracted from a cycle's start time: `updatedAt` has whole seconds.
    pub lag: Duration,
    /// Records updated up to this long before `since` are emitted again (clock skew).
    pub overlap: Duration,
    /// Pause after a 606 (rate window full).
    pub wait_606: Duration,
    /// Pause after a 615 (too many concurrent calls).
    pub wait_615: Duration,
    /// Renew the token when less than this is left (Marketo advises 60 s).
    pub token_refresh_ahead: Duration,
}

impl Default for MarketoOptions {
    fn default() -> Self {
        let c = MarketoClassifier::default();
        MarketoOptions {
            empty_windows_to_stop: 2,
            discovery_windows: 40,
            first_id: 1,
            windows_per_poll: 4,
            read_share: 0.5,
            lag: Duration::from_secs(2),
            overlap: Duration::from_secs(300),
            wait_606: c.wait_606,
            wait_615: c.wait_615,
            token_refresh_ahead: Duration::from_secs(60),
        }
    }
}

/// A Marketo instance's Companies API.
pub struct MarketoConnector {
    name: String,
    /// The instance root, ending in `/` (no `/rest`).
    root: Url,
    http: HttpClient,
    auth: Arc<BearerAuth<MarketoTokenSource>>,
    classifier: MarketoClassifier,
    opts: MarketoOptions,
    batch_size: usize,
    /// What `describe` reported; fetched by `start` (or the first call that needs it).
    describe: RwLock<Option<Arc<Describe>>>,
    /// Mapped keys the instance has beyond the standard read fields (custom fields).
    extra_read: RwLock<Vec<String>>,
    start_lock: tokio::sync::Mutex<()>,
    /// Set once the instance answered a query URL with 414 (too long): queries then go
    /// as `POST …?_method=GET` with a form body.
    query_by_post: std::sync::atomic::AtomicBool,
    /// The lowest company id a push was answered with (`i64::MAX`: none yet), where a
    /// scan that finds no company from the first id on also looks.
    lowest_pushed_id: std::sync::atomic::AtomicI64,
    /// The store, for the ids of companies linked before a restart (a probe hint).
    store: Arc<crate::store::Store>,
}

impl std::fmt::Debug for MarketoConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarketoConnector")
            .field("name", &self.name)
            .field("root", &self.root.as_str())
            .finish_non_exhaustive()
    }
}

/// The instance root of a configured base URL: without a trailing `/rest`, ending in `/`.
fn instance_root(base: &Url) -> Url {
    let mut u = base.clone();
    let mut path = u.path().trim_end_matches('/').to_string();
    if let Some(p) = path.strip_suffix("/rest") {
        path = p.to_string();
    }
    u.set_path(&format!("{path}/"));
    u
}

impl MarketoConnector {
    /// Builds the connector from its config, resolving the client id and secret.
    pub fn new(
        name: &str,
        cfg: &MarketoConfig,
        ctx: &BuildContext,
    ) -> Result<Self, ConnectorError> {
        let secret = |r: &crate::config::SecretRef, what: &str| {
            r.resolve().map_err(|e| ConnectorError::Fatal {
                connector: name.to_string(),
                detail: format!("cannot read the {what}: {e}"),
            })
        };
        let id = secret(&cfg.client_id, "client_id")?;
        let sec = secret(&cfg.client_secret, "client_secret")?;
        Self::with_options(name, &cfg.common, id, sec, ctx, MarketoOptions::default())
    }

    /// Builds the connector from resolved credentials and explicit options (tests, tools).
    pub fn with_options(
        name: &str,
        common: &CommonConnectorConfig,
        client_id: Secret,
        client_secret: Secret,
        ctx: &BuildContext,
        opts: MarketoOptions,
    ) -> Result<Self, ConnectorError> {
        let root = instance_root(&common.base_url);
        let http =
            super::shared::http_client(name, common, QuotaReset::UsCentralMidnight, &ctx.store)?;
        let source = MarketoTokenSource::new(
            name,
            &root,
            client_id,
            client_secret,
            (common.timeouts.connect, common.timeouts.read),
        )?;
        let auth = Arc::new(BearerAuth::new(name, source, opts.token_refresh_ahead));
        Ok(MarketoConnector {
            name: name.to_string(),
            root,
            http,
            auth,
            classifier: MarketoClassifier {
                wait_606: opts.wait_606,
                wait_615: opts.wait_615,
            },
            batch_size: common.batch_size.clamp(1, poll::WINDOW as usize),
            opts,
            describe: RwLock::new(None),
            extra_read: RwLock::new(Vec::new()),
            start_lock: tokio::sync::Mutex::new(()),
            query_by_post: std::sync::atomic::AtomicBool::new(false),
            lowest_pushed_id: std::sync::atomic::AtomicI64::new(i64::MAX),
            store: ctx.store.clone(),
        })
    }

    /// The REST client's counters (calls, rejections, quota used today).
    pub fn http_metrics(&self) -> HttpMetrics {
        self.http.metrics()
    }

    /// How many access tokens were fetched from the identity service.
    pub fn token_fetches(&self) -> u64 {
        self.auth.source().fetches()
    }

    fn url(&self, path: &str) -> Result<Url, ConnectorError> {
        self.root.join(path).map_err(|e| ConnectorError::Fatal {
            connector: self.name.clone(),
            detail: format!("cannot build the URL of {path}: {e}"),
        })
    }

    /// `describe`, fetched once.
    async fn ensure_described(&self) -> Result<Arc<Describe>, ConnectorError> {
        if let Some(d) = self
            .describe
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(d);
        }
        let _one = self.start_lock.lock().await;
        if let Some(d) = self
            .describe
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(d);
        }
        let req = ApiRequest::get(
            "GET companies/describe.json",
            self.url("rest/v1/companies/describe.json")?,
        )
        .auth(self.auth.clone());
        let resp = self.http.send(req, &self.classifier).await?;
        let d = Describe::parse(resp.json_value()?).map_err(|detail| ConnectorError::Fatal {
            connector: self.name.clone(),
            detail: format!("describe: {detail}"),
        })?;
        tracing::info!(
            connector = %self.name,
            fields = d.fields.len(),
            searchable = ?d.searchable,
            "Marketo company fields described"
        );
        let d = Arc::new(d);
        *self.describe.write().unwrap_or_else(|e| e.into_inner()) = Some(d.clone());
        Ok(d)
    }

    fn described(&self) -> Option<Arc<Describe>> {
        self.describe
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Connector for MarketoConnector {
    fn http_metrics(&self) -> Option<crate::http::HttpMetrics> {
        Some(MarketoConnector::http_metrics(self))
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn start(&self) -> Result<(), ConnectorError> {
        self.ensure_described().await.map(|_| ())
    }

    /// Mapped keys `describe` did not list. The others that are not standard read fields
    /// (custom fields) are added to the scan's `fields=`.
    fn unholdable(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, String)> {
        // Text longer than its field holds (Marketo refuses the whole record otherwise);
        // never the name nor a key the record is found by.
        let Some(d) = self.described() else {
            return Vec::new();
        };
        fields
            .iter()
            .filter(|(k, _)| k.as_str() != "company" && !d.dedupe.contains(k))
            .filter_map(|(k, v)| {
                let most = d.field(k)?.length?;
                let chars = v.as_str()?.chars().count();
                (chars > most).then(|| {
                    (
                        k.clone(),
                        format!("{chars} characters, more than the {most} that Marketo's field {k:?} holds"),
                    )
                })
            })
            .collect()
    }

    fn unavailable_fields(&self, vendor_keys: &[String]) -> Vec<String> {
        let Some(d) = self.described() else {
            return Vec::new();
        };
        let mut extra = self.extra_read.write().unwrap_or_else(|e| e.into_inner());
        let mut missing = Vec::new();
        for k in vendor_keys {
            if !d.has(k) {
                missing.push(k.clone());
            } else if !poll::READ_FIELDS.contains(&k.as_str()) && !extra.contains(k) {
                extra.push(k.clone());
            }
        }
        missing
    }

    /// Problems found by reading (never writing): no updateable field in `describe`
    /// (read-only Companies API), no `id` search (the scan cannot work), no
    /// `externalCompanyId` dedupe (creates cannot be idempotent), and a refused read probe
    /// (603 access denied, 1018 API off). A Companies API made read-only by native CRM sync
    /// whose `describe` still lists updateable fields is only revealed by the first write
    /// (each record skipped with 1018, reported as rejected with that reason).
    async fn online_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let d = match self.ensure_described().await {
            Ok(d) => d,
            Err(e) => return vec![e.to_string()],
        };
        if !d.fields.iter().any(|f| f.updateable) {
            problems.push("Marketo reports no updateable company field: the Companies API is read-only on this instance (native Salesforce/Dynamics sync?); writes will fail".into());
        }
        if !d.searchable.iter().any(|s| s == "id") {
            problems.push("Marketo does not list `id` as a searchable company field: the id-range change scan cannot run".into());
        }
        if !d.dedupe.iter().any(|s| s == "externalCompanyId") {
            problems.push(format!("Marketo's company dedupe fields are {:?}, not externalCompanyId: creates cannot be keyed idempotently", d.dedupe));
        }
        let probe = async {
            let req = ApiRequest::get("GET companies.json", self.url("rest/v1/companies.json")?)
                .query("filterType", "id")
                .query("filterValues", "0")
                .auth(self.auth.clone());
            self.http
                .send(req, &self.classifier)
                .await
                .map(|_| ())
                .map_err(ConnectorError::from)
        };
        if let Err(e) = probe.await {
            problems.push(format!("reading companies failed: {e}"));
        }
        problems
    }

    async fn poll(&self, cursor: &Cursor, mode: &PollMode) -> Result<Page, ConnectorError> {
        self.scan(cursor, mode).await
    }

    fn pre_write_read(&self) -> PreWriteRead {
        // A poll cycle is a scan of every id: read the batch's records instead.
        PreWriteRead::ById
    }

    async fn read_by_ids(&self, vendor_ids: &[String]) -> Result<Page, ConnectorError> {
        self.read_ids(vendor_ids).await
    }

    fn create_fills_with_canonical_id(&self) -> Option<&str> {
        // `upsert_input` sends the canonical id when the item has no externalCompanyId.
        Some("externalCompanyId")
    }

    fn updates_are_partial(&self) -> bool {
        // A sync (`updateOnly` by id) sets the fields it is given, nothing else.
        true
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    fn max_in_flight(&self) -> usize {
        self.http.config().max_concurrent
    }

    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items.len() > self.batch_size {
            return Err(ConnectorError::Fatal {
                connector: self.name.clone(),
                detail: format!(
                    "push of {} items exceeds max_batch {}",
                    items.len(),
                    self.batch_size
                ),
            });
        }
        self.push_items(items).await
    }
}
