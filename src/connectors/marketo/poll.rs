//! Change detection without a time filter: the id-range scan and its paced cycles (see the
//! module docs of [`super`] for the scheme, its cost and what it can and cannot see).

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::MarketoConnector;
use super::wire::{Describe, parse_record, record_id};
use crate::connector::{ConnectorError, Cursor, Page, PollMode};
use crate::http::{ApiRequest, HttpError};

/// Marketo's cap on `filterValues` per query and on `batchSize`.
pub const WINDOW: i64 = 300;

/// Where a cycle that found no company from the first id on looks next: the round ids an
/// instance may start its sequence at (100,000, 1,000,000, …). One call each, only while
/// no company has been found at all.
pub const PROBE_IDS: &[i64] = &[
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
];

/// The fields a scan asks for, when the instance has them (intersected with `describe`).
pub const READ_FIELDS: &[&str] = &[
    "id",
    "externalCompanyId",
    "company",
    "website",
    "mainPhone",
    "industry",
    "numberOfEmployees",
    "annualRevenue",
    "billingStreet",
    "billingCity",
    "billingState",
    "billingCountry",
    "billingPostalCode",
    "sicCode",
    "updatedAt",
    "createdAt",
];

/// The scan's position, stored by the engine with each page as the connector's cursor.
///
/// Safe to store after every page because a page's records are exactly those of the id
/// windows below `scan_from`; `since` only moves at the end of a complete cycle, to the
/// time that cycle *began*, so a change made during a cycle behind the scan position is
/// picked up by the next cycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanCursor {
    /// The lowest id of the next window of the running cycle; `None` between cycles.
    pub scan_from: Option<i64>,
    /// The running cycle's lower time bound for the next one: when it began, minus a lag
    /// for Marketo's whole-second `updatedAt`.
    pub cycle_start: Option<DateTime<Utc>>,
    /// When the running cycle began (wall clock), for pacing.
    pub began_at: Option<DateTime<Utc>>,
    /// Records updated at or after this (less the overlap) are emitted; `None` = all.
    pub since: Option<DateTime<Utc>>,
    /// The highest company id ever seen; empty windows above it end a cycle.
    pub max_id: Option<i64>,
    /// The lowest company id ever seen. Ids only grow, so nothing new can appear below
    /// it: cycles start here.
    pub min_id: Option<i64>,
    /// Consecutive empty windows above `max_id` in the running cycle.
    pub empty_run: u32,
    /// Query calls the running cycle has made.
    pub cycle_calls: u64,
    /// No new incremental cycle starts before this (daily-budget pacing).
    pub not_before: Option<DateTime<Utc>>,
    /// The running cycle already probed [`PROBE_IDS`].
    #[serde(default)]
    pub probed: bool,
    /// A descent below the lowest id a probe found: the lowest id of the window above the
    /// next one to read going down (ids below a probe's hit were never scanned).
    #[serde(default)]
    pub descend_from: Option<i64>,
    /// Consecutive empty windows of the running descent.
    #[serde(default)]
    pub descend_empty: u32,
    /// The pushed-id hint a cycle last started early for (see [`ScanCursor::not_before`]).
    #[serde(default)]
    pub hint_tried: Option<i64>,
}

impl ScanCursor {
    /// Reads the engine's cursor (`null` = never polled).
    pub fn from_cursor(c: &Cursor) -> Result<ScanCursor, String> {
        if c.0.is_null() {
            return Ok(ScanCursor::default());
        }
        serde_json::from_value(c.0.clone()).map_err(|e| format!("unreadable cursor {}: {e}", c.0))
    }

    /// The engine's cursor.
    pub fn to_cursor(&self) -> Cursor {
        Cursor(serde_json::to_value(self).expect("the cursor serialises"))
    }
}

impl MarketoConnector {
    /// One poll: the next windows of the running cycle, or the start of a new cycle, or
    /// (too early for a new cycle) an empty page with the cursor unchanged.
    pub(super) async fn scan(
        &self,
        cursor: &Cursor,
        mode: &PollMode,
    ) -> Result<Page, ConnectorError> {
        let d = self.ensure_described().await?;
        let mut c = ScanCursor::from_cursor(cursor).map_err(|detail| ConnectorError::Fatal {
            connector: self.name.clone(),
            detail,
        })?;
        let now = Utc::now();
        let full_since = match mode {
            PollMode::Full { since } => Some(*since),
            PollMode::Incremental => None,
        };
        if c.scan_from.is_none() {
            // No company found yet, but a push of ours has since been answered with an
            // id: the instance is not empty after all, and the next cycle would find it
            // only after the pause an empty scan earned. Start it now, once per hint.
            let hint = self.pushed_id_hint();
            let early = c.max_id.is_none() && hint.is_some() && hint != c.hint_tried;
            if early {
                c.hint_tried = hint;
            }
            if full_since.is_none()
                && !early
                && let Some(nb) = c.not_before
                && now < nb
            {
                tracing::debug!(connector = %self.name, not_before = %nb, "next scan cycle paced to stay within the daily read budget");
                return Ok(Page {
                    next: cursor.clone(),
                    more: false,
                    ..Page::default()
                });
            }
            let lag = chrono::Duration::from_std(self.opts.lag).unwrap_or_default();
            c.cycle_start = Some(now - lag);
            c.began_at = Some(now);
            c.scan_from = Some(c.min_id.unwrap_or(self.opts.first_id));
            c.empty_run = 0;
            c.cycle_calls = 0;
            c.probed = false;
            if let Some(since) = full_since {
                c.since = since;
            }
        }
        let overlap = chrono::Duration::from_std(self.opts.overlap).unwrap_or_default();
        let emit_from = match full_since {
            Some(since) => since,
            None => c.since.map(|s| s - overlap),
        };
        let stop_after = if c.max_id.is_some() {
            self.opts.empty_windows_to_stop.max(1)
        } else {
            self.opts.discovery_windows.max(1)
        };
        let from = c.scan_from.expect("set above");
        let known = c
            .max_id
            .filter(|m| *m >= from)
            .map_or(0, |m| (m - from) / WINDOW + 1);
        let needed = i64::from(stop_after.saturating_sub(c.empty_run).max(1));
        let count = (known + needed).min(i64::from(self.opts.windows_per_poll.max(1)));
        let fields = self.read_fields(&d);
        if c.descend_from.is_some() {
            return self.descend(c, &fields).await;
        }
        let fetched = futures::future::join_all(
            (0..count).map(|k| self.fetch_window(from + k * WINDOW, &fields)),
        )
        .await;

        let mut page = Page::default();
        for (k, result) in fetched.into_iter().enumerate() {
            let (rows, calls) = result?;
            let lo = from + k as i64 * WINDOW;
            c.cycle_calls += calls;
            let empty = rows.is_empty();
            take_rows(&mut c, rows, emit_from, &mut page);
            let beyond = c.max_id.is_none_or(|m| lo > m);
            c.empty_run = if empty && beyond { c.empty_run + 1 } else { 0 };
            c.scan_from = Some(lo + WINDOW);
        }
        let stop_after = if c.max_id.is_some() {
            self.opts.empty_windows_to_stop.max(1)
        } else {
            self.opts.discovery_windows.max(1)
        };
        if c.empty_run >= stop_after && c.max_id.is_none() && !c.probed {
            c.probed = true;
            if self.probe(&mut c, &fields, &mut page).await? {
                page.more = true;
                page.next = c.to_cursor();
                return Ok(page);
            }
        }
        if c.empty_run >= stop_after {
            tracing::info!(
                connector = %self.name,
                calls = c.cycle_calls,
                max_id = ?c.max_id,
                "company scan cycle complete"
            );
            c.since = c.cycle_start;
            c.not_before = self.pace(c.began_at.unwrap_or(now), c.cycle_calls);
            c.scan_from = None;
            c.cycle_start = None;
            c.began_at = None;
            c.empty_run = 0;
            page.more = false;
        } else {
            page.more = true;
        }
        page.next = c.to_cursor();
        Ok(page)
    }

    /// Queries one window at each of [`PROBE_IDS`] (and at the lowest id a push was
    /// answered with, or else the lowest the store links) above the scan position, lowest
    /// first, up to the first that holds companies. From that hit the cycle goes on
    /// upwards, emitting everything (none of it was seen before), and a descent below it
    /// is queued. Returns whether anything was found.
    async fn probe(
        &self,
        c: &mut ScanCursor,
        fields: &str,
        page: &mut Page,
    ) -> Result<bool, ConnectorError> {
        let above = c.scan_from.unwrap_or(self.opts.first_id);
        let mut starts: Vec<i64> = PROBE_IDS
            .iter()
            .copied()
            .chain(self.pushed_id_hint().or_else(|| self.stored_id_hint()))
            .filter(|lo| *lo >= above)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        // One at a time, lowest first, up to the first hit: a hit far above it (an
        // outlier id) would stretch every later cycle over the whole span between them.
        let mut hit = None;
        for lo in starts {
            let (rows, calls) = self.fetch_window(lo, fields).await?;
            c.cycle_calls += calls;
            if !rows.is_empty() {
                take_rows(c, rows, None, page);
                hit = Some(lo);
                break;
            }
        }
        let Some(lo) = hit else {
            return Ok(false);
        };
        tracing::warn!(
            connector = %self.name,
            first_hit = lo,
            "no company at the first ids: found companies by probing round ids; scanning from there"
        );
        // Everything above the hit is new to us too: emit it whatever its `updatedAt`.
        c.since = None;
        c.scan_from = Some(lo + WINDOW);
        c.empty_run = 0;
        c.descend_from = Some(lo);
        c.descend_empty = 0;
        Ok(true)
    }

    /// One poll of a descent: windows below `descend_from`, emitting everything, until
    /// [`MarketoOptions::discovery_windows`](super::MarketoOptions::discovery_windows) empty ones in a row or the first id.
    async fn descend(&self, mut c: ScanCursor, fields: &str) -> Result<Page, ConnectorError> {
        let top = c.descend_from.expect("called during a descent");
        let floor = self.opts.first_id;
        let starts: Vec<(i64, i64)> = (1..=i64::from(self.opts.windows_per_poll.max(1)))
            .map(|k| (top - k * WINDOW, top - (k - 1) * WINDOW))
            .take_while(|(_, hi)| *hi > floor)
            .map(|(lo, hi)| (lo.max(floor), hi))
            .collect();
        let fetched = futures::future::join_all(
            starts
                .iter()
                .map(|(lo, hi)| self.fetch_range(*lo, *hi, fields)),
        )
        .await;
        let mut page = Page::default();
        let mut next = Some(top);
        for ((lo, _), result) in starts.iter().zip(fetched) {
            let (rows, calls) = result?;
            c.cycle_calls += calls;
            c.descend_empty = if rows.is_empty() {
                c.descend_empty + 1
            } else {
                0
            };
            take_rows(&mut c, rows, None, &mut page);
            next = Some(*lo);
            if c.descend_empty >= self.opts.discovery_windows.max(1) {
                next = None;
                break;
            }
        }
        c.descend_from = next.filter(|lo| *lo > floor);
        if c.descend_from.is_none() {
            tracing::info!(connector = %self.name, min_id = ?c.min_id, "descent below the probed ids complete");
        }
        page.more = true;
        page.next = c.to_cursor();
        Ok(page)
    }

    /// The lowest company id a push was answered with, if any: a place a probe may find
    /// the instance's companies at.
    fn pushed_id_hint(&self) -> Option<i64> {
        let id = self.lowest_pushed_id.load(Ordering::Relaxed);
        (id != i64::MAX).then_some(id)
    }

    /// The lowest id of a record of this instance the store knows (linked before a
    /// restart, when the pushed-id hint was lost), if any.
    fn stored_id_hint(&self) -> Option<i64> {
        self.store
            .begin_read()
            .and_then(|tx| tx.lowest_numeric_vendor_id(&self.name))
            .inspect_err(|e| {
                tracing::warn!(connector = %self.name, error = %e, "cannot read known company ids")
            })
            .ok()
            .flatten()
    }

    /// When the next cycle may start so that reads spread evenly over the day and stay
    /// within `read_share` of the daily budget; `None` without a budget.
    fn pace(&self, began_at: DateTime<Utc>, calls: u64) -> Option<DateTime<Utc>> {
        let budget = self.http.config().daily_budget?;
        let per_day = (budget as f64 * self.opts.read_share).max(1.0);
        let secs = 86_400.0 * calls as f64 / per_day;
        Some(began_at + chrono::Duration::milliseconds((secs * 1000.0) as i64))
    }

    /// The current state of companies `ids` (Marketo ids), 300 per call: the records a
    /// write is about to overwrite ([`crate::connector::PreWriteRead::ById`]).
    pub(super) async fn read_ids(&self, ids: &[String]) -> Result<Page, ConnectorError> {
        let d = self.ensure_described().await?;
        let fields = self.read_fields(&d);
        let mut page = Page::default();
        let mut c = ScanCursor::default();
        for chunk in ids.chunks(WINDOW as usize) {
            // Ids are Marketo's integers; anything else cannot be one of its records.
            let ids: Vec<&str> = chunk
                .iter()
                .map(String::as_str)
                .filter(|id| id.parse::<i64>().is_ok())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let (rows, _) = self.fetch_ids(ids.join(","), &fields).await?;
            take_rows(&mut c, rows, None, &mut page);
        }
        Ok(page)
    }

    /// The query's `fields=`: the standard list plus mapped keys, as far as describe has them.
    fn read_fields(&self, d: &Describe) -> String {
        let extra = self.extra_read.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<&str> = Vec::new();
        for name in READ_FIELDS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
        {
            // `id` and `updatedAt` always: a row without them cannot be read at all.
            if (d.has(name) || matches!(name, "id" | "updatedAt")) && !out.contains(&name) {
                out.push(name);
            }
        }
        out.join(",")
    }

    /// All companies with ids in `[lo, lo + 300)`, following `nextPageToken`; also the
    /// number of calls made.
    async fn fetch_window(
        &self,
        lo: i64,
        fields: &str,
    ) -> Result<(Vec<Value>, u64), ConnectorError> {
        self.fetch_range(lo, lo + WINDOW, fields).await
    }

    /// All companies with ids in `[lo, hi)` (at most 300 ids), following `nextPageToken`;
    /// also the number of calls made.
    async fn fetch_range(
        &self,
        lo: i64,
        hi: i64,
        fields: &str,
    ) -> Result<(Vec<Value>, u64), ConnectorError> {
        let ids = (lo..hi)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.fetch_ids(ids, fields).await
    }

    /// The companies with the given ids (comma-separated, at most 300), following
    /// `nextPageToken`; also the number of calls made.
    async fn fetch_ids(
        &self,
        ids: String,
        fields: &str,
    ) -> Result<(Vec<Value>, u64), ConnectorError> {
        let url = self.url("rest/v1/companies.json")?;
        let mut post_url = url.clone();
        post_url.set_query(Some("_method=GET"));
        let mut rows = Vec::new();
        let mut calls = 0u64;
        let mut token: Option<String> = None;
        loop {
            let mut form = vec![
                ("filterType".to_string(), "id".to_string()),
                ("filterValues".to_string(), ids.clone()),
                ("fields".to_string(), fields.to_string()),
                ("batchSize".to_string(), WINDOW.to_string()),
            ];
            if let Some(t) = &token {
                form.push(("nextPageToken".to_string(), t.clone()));
            }
            // The published query is a GET; 300 ids make a URL of ~2–3 KB, within the
            // 8 KB limit. Only an instance that finds it too long (414) gets the same
            // query as `POST …?_method=GET` with a form body, from then on.
            let by_post = self.query_by_post.load(Ordering::Relaxed);
            let req = if by_post {
                ApiRequest::post("POST companies.json?_method=GET", post_url.clone())
                    .form(form)
                    .idempotent(true)
                    .write(false)
            } else {
                form.into_iter().fold(
                    ApiRequest::get("GET companies.json", url.clone()),
                    |r, (k, v)| r.query(k, v),
                )
            }
            .auth(self.auth.clone());
            let resp = match self.http.send(req, &self.classifier).await {
                Err(HttpError::Rejected { status, .. })
                    if !by_post && status == reqwest::StatusCode::URI_TOO_LONG =>
                {
                    calls += 1;
                    tracing::warn!(connector = %self.name, "the query URL is too long for this instance (414): querying by POST with _method=GET from now on");
                    self.query_by_post.store(true, Ordering::Relaxed);
                    continue;
                }
                // Some instances answer a query that matches nothing with "1013 Object
                // not found" instead of an empty `result`.
                Err(HttpError::Rejected { class: "1013", .. }) => {
                    calls += 1;
                    break;
                }
                other => other?,
            };
            calls += 1;
            let body = resp.json_value()?;
            // Marketo omits `result` when nothing matched; anything else that is not an
            // array is garbage, and taking it for "no companies here" would move the scan
            // past this window without reading it.
            let result = match body.get("result") {
                Some(Value::Array(rows)) => rows.clone(),
                None if body.is_object() => Vec::new(),
                other => {
                    return Err(ConnectorError::Transient {
                        connector: self.name.clone(),
                        detail: format!(
                            "POST companies.json?_method=GET: `result` is {} instead of an array",
                            other.map_or("missing from a non-object answer", json_kind)
                        ),
                        retry_after: None,
                    });
                }
            };
            let got = result.len();
            rows.extend(result);
            let next = body
                .get("nextPageToken")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            match next {
                // A token that repeats, or one on an empty page, would loop forever.
                Some(t) if got > 0 && token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => break,
            }
        }
        Ok((rows, calls))
    }
}

/// Puts a window's rows on `page` — those updated at or after `emit_from`, all when it is
/// `None`; malformed ones as such — and widens the known id range by their ids.
fn take_rows(
    c: &mut ScanCursor,
    rows: Vec<Value>,
    emit_from: Option<DateTime<Utc>>,
    page: &mut Page,
) {
    let mut saw = |id: i64| {
        c.max_id = Some(c.max_id.map_or(id, |m| m.max(id)));
        c.min_id = Some(c.min_id.map_or(id, |m| m.min(id)));
    };
    for row in &rows {
        match parse_record(row) {
            Ok((id, rec)) => {
                saw(id);
                if emit_from.is_none_or(|f| rec.updated_at >= f) {
                    page.records.push(rec);
                }
            }
            Err(bad) => {
                if let Some(id) = row.as_object().and_then(record_id) {
                    saw(id);
                }
                page.malformed.push(bad);
            }
        }
    }
}

/// A JSON value's kind, for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
