//! The Rally CRM connector: reads companies by `updatedSince` with offset paging that never
//! skips, and writes them with updates by id, bulk upserts by domain and guarded creates.
//!
//! # Reading (poll)
//! Rally's list answers a bare array ordered in a way the document does not state (the
//! simulator orders by `createdAt`, then `id` — not by `updatedAt`), takes `limit` (we
//! assume at most 100), `offset` and an inclusive `updatedSince`. The cursor is
//! `{"since", "cycle_start", "offset", "tail", "probe", "restarts"}` (times RFC 3339 UTC
//! with `Z`).
//!
//! - A **cycle** lists `updatedSince = since − overlap` (5 s by default; inclusive, so
//!   rows written at the boundary are read twice rather than never) with
//!   `limit = page_size` and growing `offset`. `cycle_start = now − lag` (2 s) is fixed
//!   when the cycle starts, taking the *earlier* of our clock and the server's `Date`
//!   header so that a fast local clock cannot push the bound into the server's future.
//! - The cycle ends at a page shorter than `limit` by **raw** row count (malformed rows
//!   count); the next cycle's `since` is `cycle_start`. Anything written after
//!   `cycle_start` has `updatedAt ≥ cycle_start > since − overlap` of the next cycle, so
//!   records changed while a cycle runs are read by the next one.
//! - `PollMode::Full { since }` runs the same scheme from `since` (or everything).
//! - Paging overlaps by one row: after a full page ending at position `p`, the next call
//!   asks `offset = p − slack` (`slack` = 0 at first). The cursor keeps the keys
//!   (`id@updatedAt`) of the page's last 3 rows (the *tail*). A page continues the read
//!   right after the last tail row it contains. If it contains none, rows shifted: the next
//!   call backs up one page (the page ending at `p`) and `slack` doubles (2, 4, … at most
//!   half a page) for the rest of the cycle, so a steady stream of deletes ahead of our
//!   place cannot make every page miss the tail. If the back-up page has no tail row
//!   either, the cycle re-reads from offset 0 (same bounds). Repeats are fine: the engine
//!   de-duplicates by content hash.
//!
//! **Why this never skips.** Call *S* the rows that pass the cycle's filter and are neither
//! changed nor deleted while it runs (changed and new rows get `updatedAt ≥ cycle_start`
//! and belong to the next cycle; deleted rows need no reading). We assume only that one
//! list answer is a consistent snapshot and that the listing order of rows that do not
//! change is stable (true for `createdAt, id`; also true for an order by `updatedAt`,
//! where only changed rows move). Invariant: *every S-row ordered before the last row
//! handed out has been handed out.* It holds for a page fetched at offset 0 (the page is
//! the start of the order). For a later page, a tail row matched by id **and** unchanged
//! `updatedAt` is a row whose place in the order did not move; the snapshot holds every
//! row from it to the page's end contiguously, so every S-row between the last row handed
//! out and the new last row is in the page — handed out now. A page with no tail row is
//! not trusted at all (its rows may lie past a gap); backing up or restarting only
//! re-reads. Inserts before our place (rows entering the filter) move the tail right —
//! found in the same page (up to `limit − 1 − slack`); up to `slack` deletes move it left —
//! found in the same page, up to `limit − 1` one page back.
//! Liveness: a restart needs the last 3 rows all deleted or updated, or `limit` deletes
//! ahead of our place, between two consecutive calls; `restarts` in the cursor counts them.
//!
//! **What it cannot see:** deletions (Rally's list has no tombstones; deletes are never
//! inferred from a scan). Rows written with a server timestamp older than
//! `cycle_start − overlap` after that cycle started (a clock step on Rally's side bigger
//! than lag + overlap).
//!
//! **Call cost:** one call per `page_size − 1` changed rows, plus one per cycle; a shift
//! costs one or two extra calls, a restart re-reads the cycle. During a long read the next
//! pages' calls are sent ahead (`read_ahead`: one after the cycle's first page, two after
//! that), so it runs at the rate limit even when answers are slow; a cycle of one or two
//! pages wastes no call, a longer one (or one that loses its place) at most two. The
//! argument above holds whatever order the answers are taken in.
//!
//! **Page size:** Rally does not document its largest page. A server that silently serves
//! fewer rows than `limit` would make a full page look like the last one. So a short page
//! of at least 10 rows, not shorter than every page served before, is checked with one
//! call right after it: rows there mean the page was not the last (the cycle goes on), and
//! a page's worth (≥ 10) means the server caps pages at that size, which list calls then
//! ask for.
//!
//! # Writing (push)
//! `max_batch` = `batch_size` (≤ 100). Items run as independent jobs, up to
//! `max_concurrent` at once (the HTTP client spaces them at the configured rate):
//! - **with a vendor id**: `PUT /api/v1/companies/{id}` with the flat fields (a partial
//!   update, idempotent). 404 (deleted in Rally) → `Rejected` unless
//!   [`RallyConnector::recreate_deleted`] is on (then created again by upsert or POST);
//!   400/409 → `Rejected` with Rally's `error` message.
//! - **without an id, with a domain**: `POST /api/v1/companies/bulk` in calls of ≤ 100.
//!   Bulk matches domains like upsert, so it is idempotent and retried on 5xx, timeouts
//!   and dropped connections (a write that landed is simply matched again); when retries
//!   run out the items are `Retry` and the engine replays them. Per-index `errors` →
//!   `Rejected(error)`. If every success was a creation (`created` = successes =
//!   `createdIds.len()`), `createdIds` map to the successful items in request order.
//!   Otherwise some matched an existing domain and the answer does not say whose id is
//!   whose. Rally keeps one company per domain, so the records updated since the bulk
//!   began (`updatedSince` = its `Date` − its duration − 2 s, all on the server's clock;
//!   a few pages) name each item's id by domain (case-insensitive); an item that look-up
//!   leaves open (a failed call, a domain two records share) is sent again to
//!   `PUT /upsert` (same body, so no change), which answers its id. `created` = the id is
//!   among `createdIds`.
//! - **without an id or domain, first attempt**: `POST /api/v1/companies/bulk` in calls of
//!   ≤ 100, never retried automatically after it may have landed (nothing matches these
//!   rows, so a resend would create them twice): an unknown outcome, or an answer whose
//!   `createdIds` cannot be paired with the items, makes every item `Unconfirmed`.
//! - The bulk body is a bare JSON array (Rally documents only the answer); a server that
//!   wants `{"companies": [...]}` is recognised by the first bulks it refuses as a whole
//!   (see `bulk_shape`).
//! - A bulk answered with a 4xx as a whole (no per-index errors: nothing was stored) is
//!   sent again item by item — upsert for items with a domain, `POST` for the others — so
//!   one record Rally refuses does not turn a hundred into dead letters.
//! - **without an id or domain, a replay**: `POST /api/v1/companies`, one by one, never
//!   retried automatically after it may have landed (the item is then `Unconfirmed`).
//!   Since the item comes back with `unconfirmed_since`, a record of the
//!   same name updated within `lookup_window` (1 h), and created no earlier than a minute
//!   before `unconfirmed_since` (an older record is someone else's: names repeat), is
//!   linked instead of creating again (the one agreeing on most pushed fields, then the
//!   newest). Residual risk: an earlier attempt that landed more than `lookup_window`
//!   ago, or was renamed since, is created twice; a same-named company someone else
//!   created since is linked (updated by later writes) instead of ours being created.
//!
//! Errors: 429 is throttled and retried after `Retry-After`; 5xx/408 retried for
//! idempotent calls; 401 → `ConnectorError::Auth` (a static key cannot be refreshed).
//! Credentials or suspension errors fail the whole push only when no item got an outcome;
//! otherwise such items are `Retry`.

mod bulk_shape;
mod poll;
mod push;
mod read_ahead;
mod wire;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use reqwest::header::HeaderName;
use url::Url;

use crate::config::RallyConfig;
use crate::connector::{Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome};
use crate::http::{
    ApiRequest, AuthProvider, DefaultClassifier, HttpClient, QuotaReset, StaticHeaderAuth,
};

use super::BuildContext;

pub use poll::CursorState;
pub use push::BULK_MAX;
pub use wire::{RecordVerdictClassifier, WRITABLE_FIELDS, parse_record};

/// Tunables of the connector that are not (yet) config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct RallyOptions {
    /// How far each cycle's `updatedSince` reaches back before the previous cycle's start.
    pub overlap: chrono::Duration,
    /// How far behind "now" a cycle's upper bound is fixed (late commits).
    pub lag: chrono::Duration,
    /// Create a record again when an update finds it deleted in Rally (404).
    pub recreate_deleted: bool,
    /// How far back a retried create looks for a record it may have created already.
    pub lookup_window: chrono::Duration,
    /// The most list pages that look-up reads.
    pub lookup_max_pages: usize,
}

impl Default for RallyOptions {
    fn default() -> Self {
        RallyOptions {
            overlap: chrono::Duration::seconds(5),
            lag: chrono::Duration::seconds(2),
            recreate_deleted: false,
            lookup_window: chrono::Duration::hours(1),
            lookup_max_pages: 20,
        }
    }
}

/// The Rally connector (see the module docs).
pub struct RallyConnector {
    name: String,
    client: HttpClient,
    auth: Arc<dyn AuthProvider>,
    /// API root, ending in `/`.
    base: Url,
    /// The `limit` list calls ask for: the configured page size, or the smaller cap the
    /// server turned out to apply silently (see `poll::PageSize`).
    page_size: poll::PageSize,
    max_batch: usize,
    max_concurrent: usize,
    opts: RallyOptions,
    /// List calls sent ahead of a long read (see `read_ahead`).
    read_ahead: read_ahead::ReadAhead,
    /// The body shape bulk calls take (see `bulk_shape`).
    bulk_shape: bulk_shape::LearntBulkShape,
}

impl std::fmt::Debug for RallyConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RallyConnector")
            .field("name", &self.name)
            .field("base", &self.base.as_str())
            .field("page_size", &self.page_size.get())
            .field("max_batch", &self.max_batch)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl RallyConnector {
    /// Builds the connector: resolves the API key, and the HTTP client from the common
    /// config (quota days reset at UTC midnight).
    pub fn new(name: &str, cfg: &RallyConfig, ctx: &BuildContext) -> Result<Self, ConnectorError> {
        let fatal = |detail: String| ConnectorError::Fatal {
            connector: name.to_string(),
            detail,
        };
        let key = cfg
            .api_key
            .resolve()
            .map_err(|e| fatal(format!("api_key: {e}")))?;
        let auth = StaticHeaderAuth::new(name, HeaderName::from_static("x-api-key"), &key)?;
        let client = crate::connectors::shared::http_client(
            name,
            &cfg.common,
            QuotaReset::UtcMidnight,
            &ctx.store,
        )?;
        let mut base = cfg.common.base_url.clone();
        if base.cannot_be_a_base() {
            return Err(fatal(format!("base_url {base} cannot carry a path")));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(RallyConnector {
            name: name.to_string(),
            client,
            auth: Arc::new(auth),
            base,
            page_size: poll::PageSize::new(cfg.page_size.clamp(2, 100)),
            max_batch: cfg.common.batch_size.clamp(1, BULK_MAX),
            max_concurrent: cfg.common.limits.max_concurrent.max(1),
            opts: RallyOptions::default(),
            read_ahead: read_ahead::ReadAhead::default(),
            bulk_shape: bulk_shape::LearntBulkShape::default(),
        })
    }

    /// Replaces the tunables (overlap, lag, 404 handling, create look-up).
    pub fn with_options(mut self, opts: RallyOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Whether an update that finds its record deleted in Rally creates it again
    /// (default: no — the item is rejected with a clear reason).
    pub fn recreate_deleted(mut self, on: bool) -> Self {
        self.opts.recreate_deleted = on;
        self
    }

    /// The HTTP client's counters (calls, retries, limiter waits).
    pub fn http_metrics(&self) -> crate::http::HttpMetrics {
        self.client.metrics()
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("static relative paths join")
    }

    /// `api/v1/companies/{id}` with `id` escaped as one path segment.
    fn company_url(&self, id: &str) -> Url {
        let mut u = self.url("api/v1/companies/");
        u.path_segments_mut()
            .expect("checked in new: the base URL can carry a path")
            .pop_if_empty()
            .push(id);
        u
    }
}

#[async_trait]
impl Connector for RallyConnector {
    fn http_metrics(&self) -> Option<crate::http::HttpMetrics> {
        Some(RallyConnector::http_metrics(self))
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// A cheap authenticated call that fails fast on a bad key (`Auth`) or a base URL
    /// that is not a Rally API (`Fatal`).
    async fn start(&self) -> Result<(), ConnectorError> {
        let req = ApiRequest::get("GET companies", self.url("api/v1/companies"))
            .auth(self.auth.clone())
            .query("limit", "1");
        let resp = self.client.send(req, &DefaultClassifier).await?;
        if resp.json.as_ref().and_then(wire::list_rows).is_some() {
            Ok(())
        } else {
            Err(ConnectorError::Fatal {
                connector: self.name.clone(),
                detail: format!(
                    "{} does not look like a Rally API: GET api/v1/companies answered {} {}",
                    self.base,
                    resp.status,
                    resp.text_snippet()
                ),
            })
        }
    }

    fn unavailable_fields(&self, vendor_keys: &[String]) -> Vec<String> {
        vendor_keys
            .iter()
            .filter(|k| {
                !WRITABLE_FIELDS.contains(&k.as_str())
                    && !["id", "tenantId", "createdAt", "updatedAt"].contains(&k.as_str())
            })
            .cloned()
            .collect()
    }

    async fn poll(&self, cursor: &Cursor, mode: &PollMode) -> Result<Page, ConnectorError> {
        self.poll_page(cursor, mode).await
    }

    // Updates stay whole (`updates_are_partial` is false): the document does not say what
    // `PUT /companies/{id}` does with a field left out, and a server that cleared it would
    // lose data, while a whole write only risks an edit made since the pre-write read.

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn max_in_flight(&self) -> usize {
        self.client.config().max_concurrent
    }

    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        // `tags` is `List<string>`, the one field the document does not mark nullable:
        // no tags is an empty list, never null (a strict server would refuse the record).
        let null_tags = |item: &PushItem| {
            item.fields
                .get("tags")
                .is_some_and(serde_json::Value::is_null)
        };
        if !items.iter().any(null_tags) {
            return self.push_items(items).await;
        }
        let items: Vec<PushItem> = items
            .iter()
            .map(|item| {
                let mut item = item.clone();
                if null_tags(&item) {
                    item.fields.insert("tags".into(), serde_json::json!([]));
                }
                item
            })
            .collect();
        self.push_items(&items).await
    }
}
