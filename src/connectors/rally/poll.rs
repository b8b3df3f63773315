//! Reading Rally's change feed: the cursor of a poll cycle and offset paging that
//! re-anchors on the last rows seen, so that rows deleted or inserted mid-cycle can make it
//! re-read but never skip (the argument is in the `rally` module docs).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::RallyConnector;
use super::read_ahead::{ListKey, READ_AHEAD};
use super::wire::{self, parse_record, wire_time};
use crate::connector::{ConnectorError, Cursor, Page, PollMode};
use crate::http::{ApiRequest, DefaultClassifier};

/// How many of a page's last rows the cursor remembers to find its place again.
const TAIL_LEN: usize = 3;

/// The decoded cursor. JSON: `{"since": RFC3339 Z | null, "cycle_start": RFC3339 Z | null,
/// "offset": n, "tail": ["<id>@<updatedAt>", …], "probe": bool, "slack": n, "restarts": n}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CursorState {
    /// Lower bound of the current (or next) cycle before the overlap; `None` = read all.
    pub since: Option<DateTime<Utc>>,
    /// Set while a cycle runs: the `since` of the next cycle (`now − lag` at its start).
    pub cycle_start: Option<DateTime<Utc>>,
    /// The offset of the next list call.
    pub offset: usize,
    /// Keys (`anchor_key`) of the last rows returned, oldest first; the next page must
    /// contain one of them (unless it starts at offset 0).
    pub tail: Vec<String>,
    /// True when `offset` is a back-up probe after a page that did not contain the tail.
    pub probe: bool,
    /// Extra rows of overlap (beyond the one) each next page re-reads: 0 at the start of a
    /// cycle, doubled each time a page lost its place, so that a steady stream of deletes
    /// ahead of our position cannot make every page miss the tail (a livelock).
    pub slack: usize,
    /// How often this cycle started over from offset 0 after losing its place.
    pub restarts: u32,
}

impl CursorState {
    /// Decodes a stored cursor (`null` = never polled: read everything).
    pub fn from_cursor(c: &Cursor) -> Result<CursorState, String> {
        let v = &c.0;
        if v.is_null() {
            return Ok(CursorState::default());
        }
        let obj = v.as_object().ok_or("the cursor is not a JSON object")?;
        let time = |k: &str| -> Result<Option<DateTime<Utc>>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => wire::parse_time(s)
                    .map(Some)
                    .ok_or_else(|| format!("cursor {k} {s:?} is not a time")),
                Some(other) => Err(format!("cursor {k} is {}", wire::kind(other))),
            }
        };
        let count = |k: &str| -> Result<u64, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(0),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .ok_or_else(|| format!("cursor {k} {n} is not a count")),
                Some(other) => Err(format!("cursor {k} is {}", wire::kind(other))),
            }
        };
        let tail = match obj.get("tail") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("cursor tail holds a non-string")?,
            Some(other) => return Err(format!("cursor tail is {}", wire::kind(other))),
        };
        Ok(CursorState {
            since: time("since")?,
            cycle_start: time("cycle_start")?,
            offset: usize::try_from(count("offset")?).map_err(|e| e.to_string())?,
            tail,
            probe: obj.get("probe").and_then(Value::as_bool).unwrap_or(false),
            slack: usize::try_from(count("slack")?).map_err(|e| e.to_string())?,
            restarts: u32::try_from(count("restarts")?).unwrap_or(u32::MAX),
        })
    }

    /// Encodes the cursor; times are UTC with an explicit `Z`.
    pub fn to_cursor(&self) -> Cursor {
        let t = |d: &Option<DateTime<Utc>>| d.as_ref().map_or(Value::Null, |d| json!(wire_time(d)));
        Cursor(json!({
            "since": t(&self.since),
            "cycle_start": t(&self.cycle_start),
            "offset": self.offset,
            "tail": self.tail,
            "probe": self.probe,
            "slack": self.slack,
            "restarts": self.restarts,
        }))
    }
}

/// Pages shorter than this are taken as the end of the listing without a check: no server
/// caps its pages that low.
const MIN_PAGE_CAP: usize = 10;

/// The page size list calls ask for. Rally does not document its largest page: a server
/// that silently returns fewer rows than asked would make a full page look like the last
/// one, and the rest of the cycle would never be read. So a short page that is not
/// shorter than every page seen before is checked once with a call right after it; if rows
/// follow, the server caps pages at that size, and list calls ask for it from then on.
#[derive(Debug)]
pub struct PageSize {
    /// What list calls ask for.
    limit: std::sync::atomic::AtomicUsize,
    /// The most rows one answer held so far: a shorter page than this is certainly the end.
    most_seen: std::sync::atomic::AtomicUsize,
}

impl PageSize {
    /// Asking for `configured` rows until the server proves to cap lower.
    pub fn new(configured: usize) -> Self {
        PageSize {
            limit: configured.into(),
            most_seen: 0.into(),
        }
    }

    /// The `limit` to ask for.
    pub fn get(&self) -> usize {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A list call asking for `limit` rows failed with `e`. A 400 that names the limit
    /// (a server that caps pages and says so, where the document assumes 100) halves the
    /// page size, down to [`MIN_PAGE_CAP`], and is retried; any other error stays as it is.
    pub fn refused(
        &self,
        connector: &str,
        limit: usize,
        e: crate::http::HttpError,
    ) -> ConnectorError {
        let names_limit = matches!(&e, crate::http::HttpError::Rejected { status, detail, .. }
            if status.as_u16() == 400 && detail.to_lowercase().contains("limit"));
        if !names_limit || limit <= MIN_PAGE_CAP {
            return e.into();
        }
        let smaller = (limit / 2).max(MIN_PAGE_CAP);
        tracing::warn!(connector, asked = limit, error = %e, "Rally refused the page size: asking for {smaller} from now on");
        self.limit
            .fetch_min(smaller, std::sync::atomic::Ordering::Relaxed);
        ConnectorError::Transient {
            connector: connector.to_string(),
            detail: format!("the page size {limit} was refused; retrying with {smaller}"),
            retry_after: None,
        }
    }
}

/// The key a row is recognised by when the next page is checked: its id and `updatedAt`
/// (a row that changed may have moved, so only an unchanged row is a valid anchor), or a
/// digest of the raw JSON for a row without them.
pub fn anchor_key(row: &Value) -> String {
    match (
        row.get("id").and_then(Value::as_str),
        row.get("updatedAt").and_then(Value::as_str),
    ) {
        (Some(id), Some(at)) => {
            // Normalise the time text so a server that varies its formatting still matches.
            let at = wire::parse_time(at)
                .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
                .unwrap_or_else(|| at.to_string());
            format!("{id}@{at}")
        }
        _ => format!("raw:{}", hex::encode(Sha256::digest(row.to_string()))),
    }
}

/// What one list page means for the cycle.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Return `rows[from..]`; the page continues the cycle's contiguous read.
    Continue {
        /// First row not yet covered.
        from: usize,
    },
    /// The page does not contain the tail: rows shifted; nothing in it can be trusted to
    /// follow what was read.
    Lost,
}

/// Where a page fetched at `offset` continues the read: at offset 0 it covers the start of
/// the listing; otherwise right after the last tail row it contains.
pub fn locate(offset: usize, tail: &[String], rows: &[Value]) -> Step {
    if offset == 0 {
        return Step::Continue { from: 0 };
    }
    if tail.is_empty() {
        return Step::Lost;
    }
    // The latest tail row present: fewest repeats (any unchanged tail row would do).
    rows.iter()
        .rposition(|r| tail.contains(&anchor_key(r)))
        .map_or(Step::Lost, |k| Step::Continue { from: k + 1 })
}

/// Advances `st` past a page of `rows` fetched at `st.offset` with `limit`; returns the
/// index of the first row to hand out (`None` when the page is not trusted) and whether
/// the cycle ended.
pub fn advance(st: &mut CursorState, rows: &[Value], limit: usize) -> (Option<usize>, bool) {
    match locate(st.offset, &st.tail, rows) {
        Step::Continue { from } => {
            if rows.len() < limit {
                // A short page by raw count: the listing ends inside it.
                return (Some(from), true);
            }
            let start = rows.len().saturating_sub(TAIL_LEN);
            st.tail = rows[start..].iter().map(anchor_key).collect();
            // One row of overlap (plus the slack): the next page starts at the last row of
            // this one. Slack stays below half a page, so each page moves on.
            st.offset = (st.offset + rows.len() - 1).saturating_sub(st.slack);
            st.probe = false;
            (Some(from), false)
        }
        Step::Lost if !st.probe => {
            // Rows before our place were deleted (the tail moved left): look at the page that
            // ends where the last row handed out was, and overlap more from now on.
            st.offset = (st.offset + st.slack).saturating_sub(limit - 1);
            st.probe = true;
            st.slack = (st.slack * 2).max(2).min(limit.saturating_sub(2) / 2);
            (None, false)
        }
        Step::Lost => {
            // The tail is gone (deleted or moved far): read the cycle again from the start.
            st.offset = 0;
            st.tail.clear();
            st.probe = false;
            st.restarts = st.restarts.saturating_add(1);
            (None, false)
        }
    }
}

impl RallyConnector {
    /// One page of the change feed (see the module docs for the scheme).
    pub(super) async fn poll_page(
        &self,
        cursor: &Cursor,
        mode: &PollMode,
    ) -> Result<Page, ConnectorError> {
        let mut st = CursorState::from_cursor(cursor).map_err(|e| ConnectorError::Fatal {
            connector: self.name.clone(),
            detail: format!("stored cursor is unreadable: {e}"),
        })?;
        if cursor.0.is_null()
            && let PollMode::Full { since } = mode
        {
            st.since = *since;
        }
        let starting = st.cycle_start.is_none();
        let local_start = Utc::now();
        if starting {
            st.offset = 0;
            st.tail.clear();
            st.probe = false;
            st.slack = 0;
            st.restarts = 0;
        }
        let limit = self.page_size.get();
        let updated_since = st.since.map(|s| wire_time(&(s - self.opts.overlap)));
        let key = |st: &CursorState, limit: usize| ListKey {
            since: updated_since.clone(),
            cycle: st.cycle_start.as_ref().map(wire_time),
            limit,
            offset: st.offset,
        };
        let list = |offset: usize| self.list_request(limit, offset, updated_since.as_deref());
        // A cycle's first call is never sent ahead: its answer fixes the cycle's bounds.
        let ahead = if starting {
            self.read_ahead.clear();
            None
        } else {
            self.read_ahead.take(&key(&st, limit))
        };
        let sent = match ahead {
            Some(call) => call.await.map_err(|e| ConnectorError::Transient {
                connector: self.name.clone(),
                detail: format!("a list call sent ahead did not finish: {e}"),
                retry_after: None,
            })?,
            None => self.client.send(list(st.offset), &DefaultClassifier).await,
        };
        let resp = sent.map_err(|e| self.page_size.refused(&self.name, limit, e))?;
        if starting {
            // The server's clock decides which rows count as updated: if ours runs ahead,
            // `now − lag` could lie in the server's future and the next cycle would miss
            // rows. Take the earlier of both clocks.
            let server_now = resp
                .headers
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| DateTime::parse_from_rfc2822(s).ok())
                .map(|d| d.with_timezone(&Utc));
            let now = server_now.map_or(local_start, |s| s.min(local_start));
            st.cycle_start = Some(now - self.opts.lag);
        }
        let rows = match resp.json.as_ref().map(|v| (v, wire::list_rows(v))) {
            Some((_, Some(rows))) => rows,
            Some((other, None)) => {
                return Err(ConnectorError::Transient {
                    connector: self.name.clone(),
                    detail: format!(
                        "GET companies answered {} instead of a JSON array of companies",
                        wire::kind(other)
                    ),
                    retry_after: None,
                });
            }
            None => {
                return Err(ConnectorError::Transient {
                    connector: self.name.clone(),
                    detail: format!("GET companies answered non-JSON: {}", resp.text_snippet()),
                    retry_after: None,
                });
            }
        };
        let fetched_at = st.offset;
        let limit = self
            .page_limit(rows.len(), limit, || list(fetched_at + rows.len()))
            .await?;
        let restarts_before = st.restarts;
        let (from, done) = advance(&mut st, rows, limit);
        if st.restarts > restarts_before {
            tracing::warn!(
                connector = %self.name,
                offset = fetched_at,
                restarts = st.restarts,
                "lost our place in the listing (rows deleted or moved mid-cycle): re-reading this cycle from offset 0"
            );
        } else if from.is_none() {
            tracing::debug!(connector = %self.name, offset = fetched_at, "page shifted: backing up one page");
        }
        let mut page = Page::default();
        for row in &rows[from.unwrap_or(rows.len())..] {
            match parse_record(row) {
                Ok(r) => page.records.push(r),
                Err(m) => {
                    tracing::warn!(connector = %self.name, vendor_id = m.vendor_id.as_deref().unwrap_or("-"), reason = %m.reason, "malformed Rally record");
                    page.malformed.push(m);
                }
            }
        }
        if done {
            self.read_ahead.clear();
            st = CursorState {
                since: st.cycle_start,
                ..CursorState::default()
            };
        } else if from.is_some() {
            // A full page, placed: the next call's offset is known, and the one after it
            // if that page is full too. One page ahead after the cycle's first page, so a
            // cycle of two pages wastes no call; more once the read proves long.
            let limit = self.page_size.get();
            let next = key(&st, limit);
            let after = ListKey {
                offset: (next.offset + limit - 1).saturating_sub(st.slack),
                ..next.clone()
            };
            let pages_read = (st.offset + 1) / (limit - 1).max(1);
            let keys: Vec<ListKey> = [next, after]
                .into_iter()
                .take(READ_AHEAD.min(pages_read))
                .collect();
            self.read_ahead.keep(&keys, |k| {
                let client = self.client.clone();
                let req = self.list_request(k.limit, k.offset, k.since.as_deref());
                tokio::spawn(async move { client.send(req, &DefaultClassifier).await })
            });
        } else {
            self.read_ahead.clear();
        }
        page.more = !done;
        page.next = st.to_cursor();
        Ok(page)
    }
}

impl RallyConnector {
    /// `GET companies` for one page.
    fn list_request(&self, limit: usize, offset: usize, updated_since: Option<&str>) -> ApiRequest {
        let req = ApiRequest::get("GET companies", self.url("api/v1/companies"))
            .auth(self.auth.clone())
            .query("limit", limit.to_string())
            .query("offset", offset.to_string());
        match updated_since {
            Some(since) => req.query("updatedSince", since.to_string()),
            None => req,
        }
    }

    /// The page size a page of `rows` rows asked with `limit` was served at: `limit`,
    /// or `rows` when the page was short although more rows follow (checked with
    /// `next_page`, see [`PageSize`]); when a page's worth follows, list calls ask for
    /// `rows` from now on.
    async fn page_limit(
        &self,
        rows: usize,
        limit: usize,
        next_page: impl FnOnce() -> ApiRequest,
    ) -> Result<usize, ConnectorError> {
        use std::sync::atomic::Ordering;
        let most_seen = self.page_size.most_seen.fetch_max(rows, Ordering::Relaxed);
        if rows >= limit || rows < MIN_PAGE_CAP || rows < most_seen {
            return Ok(limit);
        }
        let resp = self.client.send(next_page(), &DefaultClassifier).await?;
        let following = resp
            .json
            .as_ref()
            .and_then(wire::list_rows)
            .map_or(0, <[Value]>::len);
        if following == 0 {
            return Ok(limit);
        }
        // Rows follow: this page was not the last, whatever the cause. A few rows may just
        // have been written meanwhile; a page's worth means the server caps pages.
        if following >= MIN_PAGE_CAP {
            tracing::warn!(connector = %self.name, asked = limit, served = rows, "Rally served fewer rows than asked although more follow: it caps pages at {rows}; asking for {rows} from now on");
            self.page_size.limit.store(rows, Ordering::Relaxed);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, at: &str) -> Value {
        json!({"id": id, "name": id, "updatedAt": at})
    }

    fn rows(ids: &[&str]) -> Vec<Value> {
        ids.iter().map(|i| row(i, "2025-01-01T00:00:00Z")).collect()
    }

    #[test]
    fn cursor_round_trips_with_z_times() {
        let st = CursorState {
            since: wire::parse_time("2025-01-01T10:00:00.5+01:00"),
            cycle_start: wire::parse_time("2025-01-01T10:00:00Z"),
            offset: 99,
            tail: vec!["a@x".into()],
            probe: true,
            slack: 4,
            restarts: 2,
        };
        let c = st.to_cursor();
        assert_eq!(c.0["since"], json!("2025-01-01T09:00:00.500Z"), "{c:?}");
        assert_eq!(CursorState::from_cursor(&c).unwrap(), st);
    }

    #[test]
    fn a_full_page_moves_the_offset_to_its_last_row() {
        let mut st = CursorState::default();
        let (from, done) = advance(&mut st, &rows(&["a", "b", "c"]), 3);
        assert_eq!((from, done, st.offset), (Some(0), false, 2));
        let (from, done) = advance(&mut st, &rows(&["c", "d", "e"]), 3);
        assert_eq!((from, done, st.offset), (Some(1), false, 4));
    }

    #[test]
    fn an_updated_anchor_does_not_match() {
        let mut st = CursorState::default();
        advance(&mut st, &rows(&["a", "b", "c"]), 3);
        let moved = vec![
            row("c", "2025-02-01T00:00:00Z"),
            row("d", "2025-01-01T00:00:00Z"),
        ];
        assert_eq!(locate(st.offset, &st.tail, &moved), Step::Lost);
    }

    #[test]
    fn losing_the_tail_widens_the_overlap_but_pages_still_advance() {
        let mut st = CursorState::default();
        let page = |first: usize| -> Vec<Value> {
            (first..first + 10)
                .map(|i| row(&format!("r{i}"), "2025-01-01T00:00:00Z"))
                .collect()
        };
        advance(&mut st, &page(0), 10);
        assert_eq!(st.offset, 9);
        // r9 was deleted: offset 9 now holds r11 onwards.
        assert_eq!(advance(&mut st, &page(11), 10), (None, false));
        assert_eq!((st.offset, st.probe, st.slack), (0, true, 2));
        advance(&mut st, &page(0), 10);
        // Next page starts two rows earlier than the last row handed out.
        assert_eq!((st.offset, st.probe), (7, false));
        let (from, _) = advance(&mut st, &page(7), 10);
        assert_eq!((from, st.offset), (Some(3), 14));
    }

    #[test]
    fn a_lost_page_backs_up_one_page_then_restarts() {
        let mut st = CursorState::default();
        advance(&mut st, &rows(&["a", "b", "c"]), 3);
        advance(&mut st, &rows(&["c", "d", "e"]), 3);
        assert_eq!(advance(&mut st, &rows(&["x", "y"]), 3), (None, false));
        assert_eq!((st.offset, st.probe), (2, true));
        assert_eq!(advance(&mut st, &rows(&["z"]), 3), (None, false));
        assert_eq!((st.offset, st.probe, st.restarts), (0, false, 1));
    }
}
